"""Generation cost: diffusers' AudioLDM recipe vs our pipeline, per stage, on this machine.

The AudioLDM-S architecture with random weights (`s-random`: the trained model's compute), a 5 s
clip, 2 torch threads. Contenders:

- `diffusers`: diffusers' own (deprecated) AudioLDMPipeline with its defaults: 10 DDIM steps,
  fp32, guidance 2.5, the prompt encoded on every call, the whole clip vocoded at the end (first
  audio = total);
- `ours-ddim-fp32`: our loop (models/audioldm.py) on the same recipe: same work, a sanity row;
- `ours`: DPM-Solver++ at the same 10 steps, bf16 autocast where the CPU has it, the text
  embedding cached (a live session repeats its prompts), progressive vocoding;
- `ours-compiled`: `ours` with the UNet and vocoder compiled ahead of time
  (models/audioldm_compiled.py), as the server runs them; run where the cache has the packages
  for the clip (`python -m models.audioldm_compiled --generator s-random --seconds 5`);
- the opt-in approximations, each on top of the fastest exact row (`ours-compiled` where it ran,
  else `ours`): `+6-steps` (DPM-Solver++ is a 2nd-order solver; 6 of its steps are as far along
  as more DDIM ones), `+guidance-until-0.5` (guidance on the first half of the steps only),
  `+deep-cache-2` and `+deep-cache-3` (the whole UNet every 2nd / 3rd step, its deep feature
  reused between: models/audioldm_unet.py), `+progressive-vae` (the first rows decoded on their
  own, the first audio out before the whole VAE decode).

How far each of ours is from the exact clip: the log-mel distance (models/audioldm.py
`mel_distance`) of its clip from the exact fp32 clip (DPM-Solver++, the same prompt, seed and
steps), against the distance between two seeds' fp32 clips (a different clip altogether). In
bf16 every row moves by about as much as bf16 alone does (its rounding, amplified over the
steps), so each approximation is also run in fp32: its own distance, without bf16's.
Random weights: the distances say how far each approximation moves this network's output, not
what a listener would hear from the trained model.

Per stage: text encoder, UNet per step (one batched guidance call), VAE decode, vocoder; total,
time to first audio, and from the last denoising step to the first audio. Medians of --repeats
runs after one untimed warm-up; JSON, a Markdown table on stdout, a PNG of stacked stage times
beside the JSON.

    python -m benchmarks.generation                   # s-random, 5 s, 10 steps, 3 repeats
    python -m benchmarks.generation --quick           # tiny preset, seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.analysis_kernels import machine_info, progress, pyplot, save_figure
from models.audioldm import AudioLDM, clip_shapes, mel_distance
from models.audioldm_compiled import CompiledNetworks
from models.audioldm_components import AudioLDMComponents, load_generator, make_scheduler
from models.export import default_cache_dir
from models.generation import GenerationRequest

PROMPT = "calm ambient pad, slow, low register"
STAGES = ("text_s", "unet_s", "vae_s", "vocoder_s")


@contextmanager
def stage_timer(c: AudioLDMComponents) -> Iterator[dict[str, list[float]]]:
    """Wall time of every text encoder, UNet, VAE decode and vocoder call while inside: how
    the diffusers pipeline, which reports nothing, spends its time."""
    spent: dict[str, list[float]] = {"text": [], "unet": [], "vae": [], "vocoder": []}
    originals: list[tuple[Any, str, Callable[..., Any]]] = []

    def wrap(owner: Any, attribute: str, key: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[key].append(time.perf_counter() - t0)

        originals.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    wrap(c.text_encoder, "forward", "text")
    wrap(c.unet, "forward", "unet")
    wrap(c.vae, "decode", "vae")
    wrap(c.vocoder, "forward", "vocoder")
    try:
        yield spent
    finally:
        for owner, attribute, _ in originals:
            delattr(owner, attribute)  # the instance attribute goes; the class method is back


Run = Callable[[], tuple[dict[str, Any], np.ndarray | None]]  # timings, and the clip
# The opt-in approximations (GenerationRequest fields), on top of the fastest exact contender;
# "{n}-steps" comes first, with --fewer-steps.
APPROXIMATIONS: dict[str, dict[str, Any]] = {
    "guidance-until-0.5": {"guidance_until": 0.5},
    "deep-cache-2": {"deep_cache_interval": 2},
    "deep-cache-3": {"deep_cache_interval": 3},
    "progressive-vae": {"progressive_vae": True},
}
UNCOMPARED = {"diffusers", "ours-ddim-fp32"}  # DDIM: no distance from the DPM-Solver++ clip


@dataclass
class Contender:
    run: Run
    steps: int
    approximation: dict[str, Any] | None = None  # an approximation's request fields


def run_diffusers(c: AudioLDMComponents, seconds: float, steps: int) -> tuple[dict, None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it lives under diffusers' deprecated pipelines
        from diffusers.pipelines.deprecated.audioldm.pipeline_audioldm import AudioLDMPipeline

        pipe = AudioLDMPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
            scheduler=make_scheduler(c.scheduler_config, "ddim"), vocoder=c.vocoder,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        with stage_timer(c) as spent:
            t0 = time.perf_counter()
            pipe(
                PROMPT, audio_length_in_s=seconds, num_inference_steps=steps, guidance_scale=2.5,
                generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
            total = time.perf_counter() - t0
    return {
        "total_s": total,
        "first_audio_s": total,  # the whole clip is vocoded at the end
        "after_denoising_s": sum(spent["vae"]) + sum(spent["vocoder"]),
        "text_s": sum(spent["text"]),
        "unet_s": sum(spent["unet"]),
        "unet_step_s": float(np.median(spent["unet"])),
        "vae_s": sum(spent["vae"]),
        "vocoder_s": sum(spent["vocoder"]),
    }, None


def run_ours(
    pipeline: AudioLDM, seconds: float, steps: int, scheduler: str = "dpm++",
    cached: bool = True, seed: int = 0, **approximation: Any,
) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    if not cached:
        pipeline._text_cache.clear()
    request = GenerationRequest(
        PROMPT, seconds=seconds, seed=seed, steps=steps, scheduler=scheduler, **approximation
    )
    timings: dict[str, Any] = {}
    blocks = []
    for block in pipeline.generate(request):
        timings = block.timings or timings
        blocks.append(block.audio)
    return {
        "total_s": timings["total_s"],
        "first_audio_s": timings["first_audio_s"],
        "after_denoising_s": timings["first_audio_after_denoising_s"],
        "text_s": timings["text_s"],
        "unet_s": sum(timings["unet_steps"]),
        "unet_step_s": float(np.median(timings["unet_steps"])),
        "vae_s": timings["vae_s"],
        "vocoder_s": timings["vocoder_s"],
    }, np.concatenate(blocks)


def contenders(
    c: AudioLDMComponents, fp32: AudioLDM, seconds: float, steps: int, fewer: int
) -> dict[str, Contender]:
    """The exact contenders, then the approximations on top of the fastest exact one."""
    fast, compiled = AudioLDM(c), AudioLDM(c)
    runs = {
        "diffusers": Contender(lambda: run_diffusers(c, seconds, steps), steps),
        "ours-ddim-fp32": Contender(lambda: run_ours(fp32, seconds, steps, "ddim", False), steps),
        "ours": Contender(lambda: run_ours(fast, seconds, steps), steps),
    }
    base, best = "ours", fast
    compiled.compiled = CompiledNetworks(c, compiled.bf16, default_cache_dir())
    if not compiled.compiled.missing(clip_shapes(seconds, compiled.vae_scale)):
        runs["ours-compiled"] = Contender(lambda: run_ours(compiled, seconds, steps), steps)
        base, best = "ours-compiled", compiled
    else:
        progress(f"ours-compiled left out: no packages for {seconds:g} s clips in the cache "
                 f"(python -m models.audioldm_compiled --generator {c.name} --seconds "
                 f"{seconds:g})")  # fmt: skip
    approximations = {f"{fewer}-steps": {"steps": fewer}, **APPROXIMATIONS}
    for name, fields in approximations.items():
        fields = {"steps": steps, **fields}
        runs[f"{base}+{name}"] = Contender(
            lambda f=fields: run_ours(best, seconds, **f), fields["steps"], fields
        )
    return runs


def exact_clips(fp32: AudioLDM, seconds: float, steps: int) -> tuple[np.ndarray, float]:
    """The exact fp32 clip every row of ours is compared with, and how far another seed's is."""
    exact = run_ours(fp32, seconds, steps)[1]
    other = run_ours(fp32, seconds, steps, seed=1)[1]
    return exact, mel_distance(exact, other)


def median_row(name: str, runs: list[dict[str, Any]], steps: int, seconds: float) -> dict:
    row: dict[str, Any] = {"contender": name, "steps": steps, "runs": len(runs)}
    for key in runs[0]:
        row[key] = float(np.median([r[key] for r in runs]))
    row["real_time_factor"] = row["total_s"] / seconds
    return row


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    lines = [
        "| contender | steps | total s | first audio s | after the last step s | text s | "
        "UNet s/step | VAE s | "
        "vocoder s | x real time | speed-up | first-audio speed-up | distance from the exact "
        "fp32 clip (of two seeds') | the approximation alone: in fp32 (of two seeds') |",
        "|" + " --- |" * 14,
    ]
    for r in rows:
        lines.append(
            f"| {r['contender']} | {r['steps']} | {r['total_s']:.2f} | {r['first_audio_s']:.2f} | "
            f"{r['after_denoising_s']:.2f} | {r['text_s']:.3f} | {r['unet_step_s']:.3f} | "
            f"{r['vae_s']:.2f} | "
            f"{r['vocoder_s']:.2f} | {r['real_time_factor']:.2f} | "
            f"{base['total_s'] / r['total_s']:.2f}x | "
            f"{base['first_audio_s'] / r['first_audio_s']:.2f}x | "
            f"{_distance(r, 'distance')} | {_distance(r, 'distance_fp32')} |"
        )
    return "\n".join(lines)


def _distance(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.3f} ({row[key + '_of_seeds']:.2f})"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Stacked stage seconds per contender, first-audio marks; False without matplotlib."""
    if (plt := pyplot()) is None:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    names = [r["contender"] for r in rows]
    bottom = np.zeros(len(rows))
    for stage in STAGES:
        values = np.array([r[stage] for r in rows])
        ax.bar(names, values, bottom=bottom, label=stage.removesuffix("_s"))
        bottom += values
    ax.scatter(names, [r["first_audio_s"] for r in rows], marker="v", color="black", zorder=3,
               label="first audio")  # fmt: skip
    ax.set(ylabel="seconds (median)")
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right")  # the approximations' long names
    save_figure(plt, fig, ax, path, title)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="s-random", help="generator preset (tiny, s-random)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fewer-steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 1 s, 2 steps, 1 run")
    parser.add_argument(
        "--only", nargs="+", metavar="CONTENDER", help="run these contenders only (e.g. diffusers)"
    )
    parser.add_argument("--out", help="JSON path (default benchmarks/results/generation-<preset>)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.seconds, args.steps, args.fewer_steps, args.repeats = (
            "tiny", 1.0, 2, 1, 1,
        )  # fmt: skip
    torch.set_num_threads(args.threads)
    progress(f"building the {args.preset} generator")
    components = load_generator(args.preset)
    fp32 = AudioLDM(components, bf16=False)
    runs = contenders(components, fp32, args.seconds, args.steps, args.fewer_steps)
    if unknown := set(args.only or ()) - set(runs):
        parser.error(f"unknown contender(s) {sorted(unknown)}; one of {sorted(runs)}")
    if args.only:
        runs = {name: runs[name] for name in args.only}
    rows = []
    with torch.no_grad():
        exact, seeds_apart = None, float("nan")
        if set(runs) - UNCOMPARED:
            progress("the exact fp32 clip, and another seed's, for the distances")
            exact, seeds_apart = exact_clips(fp32, args.seconds, args.steps)
        for name, contender in runs.items():
            progress(f"{name}: warm-up")
            _, audio = contender.run()
            results = []
            for i in range(args.repeats):
                results.append(contender.run()[0])
                progress(f"{name}: run {i + 1}/{args.repeats}: {results[-1]['total_s']:.2f} s")
            row = median_row(name, results, contender.steps, args.seconds)
            rows.append(row)
            if exact is None or audio is None or name in UNCOMPARED:
                continue
            row["distance"] = mel_distance(audio, exact)
            row["distance_of_seeds"] = row["distance"] / seeds_apart
            if contender.approximation is not None:  # its own share: the same, in fp32
                alone = run_ours(fp32, args.seconds, **contender.approximation)[1]
                row["distance_fp32"] = mel_distance(alone, exact)
                row["distance_fp32_of_seeds"] = row["distance_fp32"] / seeds_apart
    info = machine_info(args.threads)
    bf16 = AudioLDM(components).bf16
    title = (
        f"AudioLDM {args.preset}, {args.seconds:g} s clip, {args.threads} threads, bf16 "
        f"{'on' if bf16 else 'off'} ({info['cpu']})"
    )
    out = Path(args.out or f"benchmarks/results/generation-{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "preset": args.preset, "seconds": args.seconds, "prompt": PROMPT, "bf16": bf16,
        "machine": info, "seeds_distance": seeds_apart, "rows": rows,
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")
    plotted = plot(rows, out.with_suffix(".png"), title)
    print(f"## {title}\n\n{table(rows)}\n")
    print(f"JSON: {out}" + (f", plot: {out.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
