"""ONNX artifacts of wav2vec2 models: fp32 -> fp32-opt -> int8, verified, cached on disk.

Layout: `<root>/onnx/<slug of checkpoint key>/<variant>-opset17-<hash>/` holding `encoder.onnx`
(audio -> conv features, fp32), for int8 of group-norm checkpoints also `encoder-int8.onnx`
(int8 with a scale per row, for economy mode: models/encoder_int8.py), for
group-norm checkpoints `first_conv.npz` (models/conv_norm.py), the variant's
`transformer.onnx` (features -> hidden + head) and `meta.json`; root = $GRYM_CACHE_DIR or
~/.cache/grym-stream. Two graphs, so that a runner can reuse a stream's conv features across
overlapping windows and run only the transformer over each whole window. The folder hash covers
the library versions and EXPORT_FORMAT, so upgrading torch/onnx/onnxruntime/transformers or
changing the export wrappers makes a new artifact instead of silently reusing one made otherwise.

Reusing an artifact needs neither torch nor transformers (keys are computed by models.presets);
only making one imports models.wav2vec2. Each artifact is written into a temp folder beside its
final place and renamed into it, under a per-checkpoint file lock, so a crash or two concurrent
exports never leave a half-written folder that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from models.conv_norm import FILE as FIRST_CONV_FILE
from models.presets import ModelSpec, checkpoint_key, resolve_model

VARIANTS = ("fp32", "fp32-opt", "int8")  # each made from the one before it
OPSET = 17  # = models.wav2vec2.OPSET (not imported from there: that would import torch)
# The two graphs of an artifact (models.wav2vec2.export_onnx writes them), run in this order.
GRAPHS = ("encoder.onnx", "transformer.onnx")
# The encoder's files: its graph and, for group-norm checkpoints, its first conv's weights.
ENCODER_FILES = ("encoder.onnx", FIRST_CONV_FILE)
# int8 artifacts of group-norm checkpoints: the conv encoder in int8 too (models/encoder_int8.py).
INT8_ENCODER = "encoder-int8.onnx"
EXPORT_FORMAT = 6  # bump when the wrapper's inputs/outputs, the pipeline or the meta change
# 6: do_normalize also read from processor_config.json (transformers 5), and where it came from
_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime")


@dataclass(frozen=True)
class Artifact:
    folder: Path  # holds GRAPHS and meta.json
    meta: dict[str, Any]
    spec: ModelSpec
    reused: bool  # True when it came from the cache without exporting anything


def default_cache_dir() -> Path:
    """$GRYM_CACHE_DIR, else ~/.cache/grym-stream."""
    env = os.environ.get("GRYM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "grym-stream"


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (no imports)."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _slug(key: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")
    if len(slug) > 80:  # keep paths short; the hash keeps truncated slugs distinct
        slug = slug[:60] + "_" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return slug


def artifact_dir(root: Path, key: str, variant: str) -> Path:
    """Where the artifact of (checkpoint key, variant) lives under the cache root."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    stamp = json.dumps(
        {"key": key, "versions": library_versions(), "format": EXPORT_FORMAT}, sort_keys=True
    )
    short = hashlib.sha256(stamp.encode()).hexdigest()[:10]
    return root / "onnx" / _slug(key) / f"{variant}-opset{OPSET}-{short}"


def _load_cached(folder: Path) -> dict[str, Any] | None:
    """meta.json of a complete artifact, or None (missing, unreadable, or size mismatch)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        sizes = meta["file_sizes"]
        for name in {*GRAPHS, *sizes}:
            if (folder / name).stat().st_size != sizes[name]:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def _step(label: str, enabled: bool) -> Iterator[None]:
    """`label... 1.2 s` on stderr, so a long export visibly progresses."""
    start = time.perf_counter()
    if enabled:
        print(f"{label}...", end="", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        if enabled:
            print(" failed", file=sys.stderr, flush=True)
        raise
    if enabled:
        print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # quantize_dynamic logs a "consider pre-processing" advice on the root logger on every call;
    # it does not apply (shape inference is what the optimizer already did).
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _optimize(src: Path, dst: Path, num_heads: int, hidden_size: int) -> tuple[str, dict[str, int]]:
    """onnxruntime's transformer fusions. wav2vec2 has no model type of its own: "clip" fuses
    Attention on legacy eager exports (notes); "bert" is tried when clip fuses no attention."""
    from onnxruntime.transformers.optimizer import optimize_model

    best = None
    for model_type in ("clip", "bert"):
        optimized = optimize_model(
            str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size
        )
        stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items()}
        if best is None or stats.get("Attention", 0) > best[2].get("Attention", 0):
            best = (optimized, model_type, stats)
        if stats.get("Attention", 0) > 0:
            break
    assert best is not None
    best[0].save_model_to_file(str(dst))
    return best[1], best[2]


def _quantize(src: Path, dst: Path) -> None:
    """Dynamic int8 of the transformer's MatMul/Attention weights. (onnxruntime's int8 Conv is
    slower and less accurate, static int8 too: docs/fidelity.md; the conv encoder has its own
    int8 graph, models/encoder_int8.py.) DefaultTensorType is needed on the optimizer's output
    graph."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Attention"],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def _unfuse_skip_layer_norm(path: Path) -> int:
    """Replace each SkipLayerNormalization by Add (+ Add of its bias) and LayerNormalization, in
    place; returns how many. onnxruntime's CPU kernel for the fused op is slow here (0.4 ms per
    call on a 2 s window of base, 25 calls: a sixth of the int8 transformer's time on one
    thread), the plain ops are not; the optimizer needs the fused op to find Attention, so it
    is undone after quantisation. Same maths: only int8 rounding moves (argmax against PyTorch
    on held-out speech, base-random: 0.945 -> 0.943)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type != "SkipLayerNormalization":
            nodes.append(node)
            continue
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if outputs[1] or outputs[2]:  # mean and inverse std: never used by these graphs
            raise ValueError(f"{node.name}: its mean/inv_std outputs are not supported")
        count += 1
        inputs = list(node.input) + [""] * (5 - len(node.input))
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        # The sum (input + skip + bias) keeps its name where the next layer reads it too.
        summed = f"{node.name}/sum"
        total = outputs[3] if outputs[3] and not inputs[4] else summed
        nodes.append(helper.make_node("Add", inputs[:2], [total], name=f"{node.name}/add"))
        if inputs[4]:  # the fused op's optional bias, added to the sum
            biased = outputs[3] or f"{summed}+bias"
            nodes.append(helper.make_node("Add", [total, inputs[4]], [biased],
                                          name=f"{node.name}/bias"))  # fmt: skip
            total = biased
        norm_inputs = [total, inputs[2]] + ([inputs[3]] if inputs[3] else [])
        nodes.append(helper.make_node("LayerNormalization", norm_inputs, [outputs[0]],
                                      name=f"{node.name}/norm", axis=-1, epsilon=eps))  # fmt: skip
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(path))
    return count


def _make(
    loaded: Any, variant: str, parent: Path | None, final: Path, progress: bool, label: str
) -> dict[str, Any]:
    """Make one variant in a temp folder beside `final`, verify it, then rename it into place."""
    from models import wav2vec2

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{variant}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared read-only
    try:
        extra: dict[str, Any] = {}
        start = time.perf_counter()
        if parent is not None:  # every variant has the same fp32 encoder
            for name in ENCODER_FILES:
                if (parent / name).is_file():
                    _link_or_copy(parent / name, tmp / name)
        # int8 of group-norm checkpoints also has an int8 one (economy mode).
        stack = wav2vec2.conv_stack(loaded) if variant == "int8" else None
        transformer = tmp / "transformer.onnx"
        if variant == "fp32":
            with _step(f"{label}: exporting fp32", progress):
                wav2vec2.export_onnx(loaded, tmp)
        elif variant == "fp32-opt":
            assert parent is not None
            with _step(f"{label}: optimizing", progress):
                model_type, stats = _optimize(
                    parent / "transformer.onnx",
                    transformer,
                    loaded.config.num_attention_heads,
                    loaded.config.hidden_size,
                )
            extra = {"optimizer_model_type": model_type, "fused_operators": stats}
            if progress:
                fused = ", ".join(f"{k} {v}" for k, v in stats.items() if v)
                print(
                    f"{label}: fused operators ({model_type}): {fused or 'none'}", file=sys.stderr
                )
        else:
            assert parent is not None
            with _step(f"{label}: quantizing int8", progress):
                _quantize(parent / "transformer.onnx", transformer)
                unfused = _unfuse_skip_layer_norm(transformer)
                if stack is not None:
                    import onnx

                    from models import encoder_int8

                    onnx.save(encoder_int8.build(stack), str(tmp / INT8_ENCODER))
            extra = {
                k: v
                for k, v in (_load_cached(parent) or {}).items()
                if k in ("optimizer_model_type", "fused_operators")
            }
            extra["unfused_skip_layer_norms"] = unfused
        export_seconds = time.perf_counter() - start
        with _step(f"{label}: verifying {variant} against PyTorch", progress):
            report = wav2vec2.verify_onnx(loaded, tmp, variant)
            if stack is not None:
                extra["int8_encoder_verification"] = wav2vec2.verify_onnx(
                    loaded, tmp, variant, int8_encoder=True
                )
        meta = {
            **loaded.describe(), "variant": variant, "opset": OPSET, "format": EXPORT_FORMAT,
            "versions": library_versions(), **extra, "verification": report,
            "export_seconds": round(export_seconds, 3),
            "file_sizes": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "parent": parent.name if parent else None,
        }  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists() and _load_cached(final) is None:  # damaged by hand; we hold the lock
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)  # atomic: the folder appears complete or not at all
        except OSError:
            if _load_cached(final) is None:  # someone else's complete artifact is fine too
                raise
        return _load_cached(final) or meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (base's encoder is ~17 MB), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """One exporter per checkpoint at a time; stale temp folders of dead ones are removed."""
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        for stale in folder.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


def ensure_artifact(
    model: str,
    variant: str = "fp32",
    *,
    model_dir: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Artifact:
    """The cached artifact of `model` in `variant`, made (with its parents) if missing.

    Raises models.presets.ModelLoadError for unusable models and
    models.presets.ExportVerificationError when a made artifact fails verification (nothing
    is cached then).
    """
    spec = resolve_model(model, model_dir)
    if progress and spec.reason:
        print(spec.reason, file=sys.stderr)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = checkpoint_key(spec)
    chain = VARIANTS[: VARIANTS.index(variant) + 1] if variant in VARIANTS else ()
    target = artifact_dir(root, key, variant)  # raises for an unknown variant
    if (meta := _load_cached(target)) is not None:
        return Artifact(target, meta, spec, reused=True)
    with _lock(target.parent):
        if (meta := _load_cached(target)) is not None:  # made by another process meanwhile
            return Artifact(target, meta, spec, reused=True)
        folders = [artifact_dir(root, key, v) for v in chain]
        start = max((i for i, f in enumerate(folders) if _load_cached(f) is not None), default=-1)
        from models.wav2vec2_checkpoint import load_torch_model

        label = spec.name if spec.preset else key
        with _step(f"{label}: loading PyTorch model", progress):
            loaded = load_torch_model(spec)
        for index in range(start + 1, len(chain)):
            parent = folders[index - 1] if index else None
            meta = _make(loaded, chain[index], parent, folders[index], progress, label)
    return Artifact(target, meta, spec, reused=False)


def list_artifacts(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """meta.json of every complete artifact under the cache, plus its `path`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = []
    for meta_path in sorted((root / "onnx").glob("*/*/meta.json")):
        if (meta := _load_cached(meta_path.parent)) is not None:
            found.append({**meta, "path": str(meta_path.parent)})
    order = {v: i for i, v in enumerate(VARIANTS)}
    found.sort(
        key=lambda m: (
            m.get("name") or "",
            m.get("checkpoint_key", ""),
            order.get(m.get("variant"), 9),
        )
    )
    return found


def verify_artifact(
    model: str,
    variant: str = "fp32",
    *,
    model_dir: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Re-run the PyTorch comparison for a cached artifact and return the report.

    Raises FileNotFoundError when it is not cached, ExportVerificationError when it fails.
    """
    spec = resolve_model(model, model_dir)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = artifact_dir(root, checkpoint_key(spec), variant)
    if _load_cached(folder) is None:
        raise FileNotFoundError(
            f"no cached {variant} artifact of {model!r} under {root}; run "
            f"`grym-stream models export --model {model} --variant {variant}`"
        )
    from models.wav2vec2 import verify_onnx
    from models.wav2vec2_checkpoint import load_torch_model

    with _step(f"{spec.name}: loading PyTorch model", progress):
        loaded = load_torch_model(spec)
    with _step(f"{spec.name}: verifying {variant} against PyTorch", progress):
        return verify_onnx(loaded, folder, variant)
