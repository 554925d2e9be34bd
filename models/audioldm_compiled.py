"""AudioLDM's UNet and vocoder compiled ahead of time: the same networks, faster on CPUs with
bf16 matrix units (AudioLDM-S, 2 threads: a guided UNet step 0.30 -> 0.19 s, a 2 s vocoder
block 0.48 -> 0.38 s).

torch.compile would compile again in every process (70-100 s for AudioLDM-S's UNet on two
cores), so each network is compiled once with AOTInductor into a package (a shared library and
the weights: about 380 MB for AudioLDM-S's UNet) kept in the cache, which the next process loads
in half a second. Inductor's freezing (weights folded in, pre-packed into oneDNN's blocked bf16
layout, the elementwise work fused around them) is most of the gain.

Shapes are static: a package serves one input shape: a UNet one (batch, latent rows), i.e. one
clip length with or without guidance; a vocoder one (mel frames), one block of the vocoding plan.
`generation_compile_seconds` says which clip lengths are compiled; anything else runs eagerly.
A package is keyed by the network's weights (a fingerprint of every tensor), the shape, torch's
version and the CPU's kernels, so a changed checkpoint or machine never loads a stale one.

Precision: a package runs under the same bf16 autocast as the eager loop; its output is as close
to the fp32 network as the eager bf16 one is (UNet step: 1.0% relative L2, both, on AudioLDM-S;
the tests hold it to that on the tiny preset).

The first process to need a package compiles it in a child process at the caller's priority
(`Compiler`) while clips run eagerly; `python -m models.audioldm_compiled` does the same ahead
of time and shows progress.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from models.audioldm_unet import deep_feature

if TYPE_CHECKING:
    from models.audioldm_components import AudioLDMComponents

log = logging.getLogger(__name__)
# Bumped when what a network's package holds changes (unet 2: the deep feature given out too).
FORMATS = {"unet": "aoti-2", "vocoder": "aoti-1"}
# `auto` compiles UNets this large: AudioLDM-S's (185M) and up. Small ones (the tiny preset's: 1M)
# gain little and would pay the compile on every fresh machine, tests included.
AUTO_MIN_PARAMETERS = 50_000_000
FINGERPRINT_SAMPLES = 4096  # values read from each tensor for the weights' fingerprint
Network = Literal["unet", "vocoder"]


@dataclass(frozen=True)
class Shape:
    """What one package serves: the UNet's batch (2 with classifier-free guidance) and latent
    rows, or the vocoder's mel frames (batch 1)."""

    network: Network
    batch: int
    length: int

    def __str__(self) -> str:
        return f"{self.network}:{self.batch}x{self.length}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        network, _, dims = text.partition(":")
        batch, length = map(int, dims.split("x"))
        if network not in ("unet", "vocoder"):
            raise ValueError(f"no such network: {network!r}")
        return cls(network, batch, length)  # type: ignore[arg-type]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest of every tensor's name, shape, dtype and a strided sample of its values: cheap
    (milliseconds for AudioLDM-S), and different for any other checkpoint or seed."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()


class _UNetStep(torch.nn.Module):
    """The UNet call of one denoising step, as the eager loop makes it (bf16 autocast, float32
    out), and the deep feature that the steps between whole ones may reuse
    (models/audioldm_unet.py): what gets exported."""

    def __init__(self, unet: torch.nn.Module, bf16: bool) -> None:
        super().__init__()
        self.unet, self.bf16 = unet, bf16

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kept: list[torch.Tensor] = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            with deep_feature(self.unet, kept):
                out = self.unet(x, t, encoder_hidden_states=None, class_labels=embeds)
            return out.sample.float(), kept[0]


class _Vocoder(torch.nn.Module):
    """One vocoder block as the eager loop makes it: (1, frames, bins) mel -> (1, samples)."""

    def __init__(self, vocoder: torch.nn.Module, bf16: bool) -> None:
        super().__init__()
        self.vocoder, self.bf16 = vocoder, bf16

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.vocoder(mel).float()


class CompiledNetworks:
    """The packages of one generator's UNet and vocoder in one cache folder: their paths,
    loading them as they appear, and compiling missing ones."""

    def __init__(self, components: AudioLDMComponents, bf16: bool, cache_dir: Path) -> None:
        self.c, self.bf16 = components, bf16
        self.folder = Path(cache_dir) / "compiled"
        self.bins = components.vocoder.config.model_in_dim  # mel bins
        self.row = 2 ** (len(components.vae.config.block_out_channels) - 1)  # mel frames a row
        self._fingerprints = {
            "unet": weights_fingerprint(components.unet),
            "vocoder": weights_fingerprint(components.vocoder),
        }
        self._runners: dict[Shape, Callable[..., torch.Tensor] | None] = {}
        self.background: Compiler | None = None

    def key(self, shape: Shape) -> str:
        network = shape.network
        parts = [FORMATS[network], str(shape), self._fingerprints[network], str(self.bins),
                 str(self.bf16), torch.__version__,
                 torch.backends.cpu.get_cpu_capability()]  # fmt: skip
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

    def path(self, shape: Shape) -> Path:
        name = f"{shape.network}-b{shape.batch}-n{shape.length}-{self.key(shape)}.pt2"
        return self.folder / name

    def runner(self, shape: Shape) -> Callable[..., torch.Tensor] | None:
        """The compiled network for `shape`, loaded on first use once its package exists;
        None: run it eagerly."""
        if shape in self._runners:
            return self._runners[shape]
        path = self.path(shape)
        if not path.exists():
            return None
        try:
            import torch._inductor

            runner = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:  # noqa: BLE001 - a damaged package: eager, and say so
            log.warning("compiled %s %s did not load (%s): running eagerly", shape, path, exc)
            runner = None
        self._runners[shape] = runner
        if runner is not None:
            log.info("generator: the %s runs compiled for %s", shape.network, shape)
        return runner

    def missing(self, shapes: Sequence[Shape]) -> list[Shape]:
        return [s for s in dict.fromkeys(shapes) if not self.path(s).exists()]

    def compile_in_background(self, generator: str, shapes: Sequence[Shape]) -> None:
        """Compile `shapes` in a child process (`Compiler`); `runner` finds each package once
        it is written."""
        self.background = Compiler(generator, shapes, self.folder.parent, self.bf16)

    def compile(self, shape: Shape) -> Path:
        """Export and compile the package for `shape` (minutes for AudioLDM-S's UNet), unless
        another process made it meanwhile; written whole or not at all."""
        from filelock import FileLock

        path = self.path(shape)
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix(".lock"))):
            if path.exists():
                return path
            import torch._inductor.config as inductor

            partial = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            module, example = self._exported(shape)
            with torch.no_grad(), inductor.patch(freezing=True):
                program = torch.export.export(module.eval(), example)
                torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
            os.replace(partial, path)
        return path

    def _exported(self, shape: Shape) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
        if shape.network == "vocoder":
            return _Vocoder(self.c.vocoder, self.bf16), (torch.zeros(1, shape.length, self.bins),)
        channels = self.c.unet.config.in_channels
        embed_dim = self.c.text_encoder.config.projection_dim
        return _UNetStep(self.c.unet, self.bf16), (
            torch.zeros(shape.batch, channels, shape.length, self.bins // self.row),
            torch.tensor(500, dtype=torch.int64),  # a timestep, as the schedulers give them
            torch.zeros(shape.batch, embed_dim),
        )


def wanted(mode: str, components: AudioLDMComponents, bf16: bool, device: str) -> bool:
    """Whether `generation_compile` (`mode`: auto, on, off) compiles this generator: on the CPU
    only; `auto` where bf16 runs and the UNet is large enough to gain."""
    if mode == "off" or device != "cpu":
        return False
    if mode == "on":
        return True
    size = sum(p.numel() for p in components.unet.parameters())
    return bf16 and size >= AUTO_MIN_PARAMETERS


class Compiler:
    """Compiles missing packages in a child process (`python -m models.audioldm_compiled`), so
    that the caller goes on running eagerly meanwhile. The child inherits the caller's CPU
    priority (the generation worker's: idle) and dies with it."""

    def __init__(
        self, generator: str, shapes: Sequence[Shape], cache_dir: Path, bf16: bool
    ) -> None:
        command = [sys.executable, "-m", "models.audioldm_compiled", "--generator", generator,
                   "--cache-dir", str(cache_dir), "--precision", "bf16" if bf16 else "fp32",
                   *map(str, shapes)]  # fmt: skip
        self.process = subprocess.Popen(command, preexec_fn=_die_with_parent)  # noqa: PLW1509

    def done(self) -> bool:
        return self.process.poll() is not None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it exits (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Compile a generator's packages for the given shapes (unet:BATCHxROWS,
    vocoder:1xFRAMES) or guided clip lengths (--seconds); packages already made are kept."""
    from models.audioldm import clip_shapes
    from models.audioldm_components import load_generator
    from models.export import default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m models.audioldm_compiled",
                                     description=main.__doc__)  # fmt: skip
    parser.add_argument("shapes", nargs="*", help="e.g. unet:2x125 (a guided 5 s clip)")
    parser.add_argument("--generator", default="s-random")
    parser.add_argument("--seconds", type=float, nargs="*", default=[], help="clip lengths")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    components = load_generator(args.generator)
    cache_dir = Path(args.cache_dir or default_cache_dir())
    compiled = CompiledNetworks(components, args.precision == "bf16", cache_dir)
    shapes = [Shape.parse(s) for s in args.shapes]
    shapes += [s for seconds in args.seconds for s in clip_shapes(seconds, compiled.row)]
    todo = compiled.missing(shapes)
    for number, shape in enumerate(todo, 1):
        log.info("compiling %s's %s (%d of %d; once per machine: on two cores about 2 minutes "
                 "for AudioLDM-S's UNet, 25 s for a vocoder block) ...", args.generator, shape,
                 number, len(todo))  # fmt: skip
        started = time.perf_counter()
        path = compiled.compile(shape)
        log.info("compiled in %.0f s: %s", time.perf_counter() - started, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
