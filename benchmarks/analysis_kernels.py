"""Analysis kernels: one wav2vec2 window on PyTorch eager vs ONNX Runtime fp32 / fp32-opt / int8.

A window is context + chunk seconds at 16 kHz (2 s by default), as the server's analyser runs it.
Every contender computes the same forward (models.wav2vec2.TorchForward: hidden state + CTC
logits, eager attention: what the ONNX graphs were exported from) on the same seeded noise with the
same intra-op threads; ORT runs an artifact's two graphs (conv encoder, then transformer) in turn.
`ort-int8+reuse` is what the server does for a stream with the feature cache on: the conv encoder
runs over the chunk's new frames only, the context's frames come from the previous window.
Times: median and p90 of --runs calls after WARMUPS untimed ones.
FLOPs per window: torch.utils.flop_counter.FlopCounterMode on the PyTorch model, which counts
matmul and convolution FLOPs only, as 2 x multiply-accumulates (norms, GELU, softmax, elementwise
ops are left out): the dense work, the same for every contender. Peak references: the same large
fp32 GEMM timed in torch ("% of matmul") and as a one-node ONNX MatMul ("% of ORT GEMM"), in the
same run with the same threads. Both matter: torch's MKL takes its AVX2 path on AMD CPUs, so on an
AVX-512 EPYC ORT's MLAS GEMM is ~2x faster and ORT contenders pass 100% of the torch figure
(int8 may pass 100% of either: its MatMuls run in int8).

    python -m benchmarks.analysis_kernels            # base-random, batch 1 and 4, 20 runs
    python -m benchmarks.analysis_kernels --quick    # tiny-random model, a few seconds (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import ANALYSIS_SAMPLE_RATE

RATE = ANALYSIS_SAMPLE_RATE
WARMUPS = 3
CONTENDERS = ("torch-eager", "ort-fp32", "ort-fp32-opt", "ort-int8", "ort-int8+reuse")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
INT8_NOTE = (
    "the server runs int8 windows one at a time (Wav2Vec2Analyser.max_batch = 1: dynamic "
    "quantisation scales per batch), so int8 rows above batch 1 are what batching would "
    "give, not what the server does"
)


def progress(message: str) -> None:
    # stderr, like the exporter's step lines, so stdout stays a clean Markdown report.
    print(message, file=sys.stderr, flush=True)


def time_calls(call: Callable[[], object], runs: int, warmups: int = WARMUPS) -> np.ndarray:
    """Seconds of each of `runs` calls, after `warmups` untimed ones (allocator, thread pools,
    ORT's first-run shape work)."""
    for _ in range(warmups):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return np.array(times)


def window_audio(batch: int, samples: int) -> np.ndarray:
    """Seeded white noise: zero-mean, unit-variance, like the analyser's normalised windows."""
    return np.random.default_rng(0).standard_normal((batch, samples)).astype(np.float32)


def count_flops(forward: Callable[[np.ndarray], object], samples: int) -> int:
    """Matmul + conv FLOPs (2 x MACs) of one batch-1 forward; they scale linearly with batch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # no_grad, not inference_mode: under inference_mode + the counter's dispatch mode, the
    # weight-norm parametrization of the positional conv fails ("no attribute 'weight'").
    with torch.no_grad(), counter:
        forward(window_audio(1, samples))
    return int(counter.get_total_flops())


def gemm_references(size: int, runs: int, threads: int) -> dict[str, dict[str, Any]]:
    """fp32 size^3 GEMM speed in torch (current thread count) and in ORT (a one-node graph)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from models.wav2vec2_runtime import session_options

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
        initializer=[numpy_helper.from_array(b, "b")],
    )  # a constant weight, as in the models
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    calls = {"torch": lambda: torch.mm(ta, tb), "onnxruntime": lambda: session.run(None, {"a": a})}
    result = {}
    for name, call in calls.items():
        median = float(np.median(time_calls(call, runs, warmups=2)))
        result[name] = {
            "size": size,
            "flops": 2 * size**3,
            "runs": runs,
            "median_ms": median * 1e3,
            "gflops": 2 * size**3 / median / 1e9,
        }
    return result


def time_batches(
    label: str, forward: Callable[[np.ndarray], object], batches: list[int], samples: int, runs: int
) -> dict[int, np.ndarray]:
    times = {}
    for batch in batches:
        progress(f"timing {label}, batch {batch} ({runs} runs)...")
        audio = window_audio(batch, samples)
        times[batch] = time_calls(lambda audio=audio: forward(audio), runs)
    return times


def reused_forward(graphs: Any, samples: int, chunk: int) -> Callable[[np.ndarray], object]:
    """The feature-cache path for windows of `samples` whose last `chunk` samples are new: the
    context's frames (cached once here, as the previous window left them) plus the encoder over
    the new frames' samples, then the transformer over all frames."""
    from models.frames import RECEPTIVE_FIELD, STRIDE, frames_in_window

    frames = frames_in_window(samples)
    reused = max(0, frames - chunk // STRIDE)
    cache: dict[int, np.ndarray] = {}

    def forward(audio: np.ndarray) -> object:
        batch = len(audio)
        if batch not in cache:
            cache[batch] = graphs.encode(audio)[:, :reused]
        # A group-norm encoder normalises the new frames over the window (models/conv_norm.py).
        norm = graphs.first_conv.window(audio) if graphs.first_conv is not None else None
        segment = audio[:, reused * STRIDE : (frames - 1) * STRIDE + RECEPTIVE_FIELD]
        new = graphs.encode(segment, norm)
        return graphs.transform(np.concatenate([cache[batch], new], axis=1))

    return forward


def make_rows(
    times: dict[str, dict[int, np.ndarray]],
    flops: dict[str, int],
    chunk: float,
    gemm: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    rows = []
    for contender, by_batch in times.items():
        for batch, samples in by_batch.items():
            median = float(np.median(samples))
            eager = float(np.median(times["torch-eager"][batch]))
            gflops = flops[contender] * batch / median / 1e9
            rows.append({
                "contender": contender, "batch": batch, "runs": len(samples),
                "flops_per_window": flops[contender],
                "median_ms": median * 1e3, "p90_ms": float(np.percentile(samples, 90)) * 1e3,
                "ms_per_window": median * 1e3 / batch,
                # the chunk is the new audio a window brings; its context is overhead
                "compute_s_per_audio_s": median / (batch * chunk),
                "gflops": gflops, "pct_of_matmul": 100 * gflops / gemm["torch"]["gflops"],
                "pct_of_ort_gemm": 100 * gflops / gemm["onnxruntime"]["gflops"],
                "speedup_vs_torch_eager": eager / median,
                "times_ms": [round(t * 1e3, 2) for t in samples],  # to judge noise afterwards
            })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| contender | batch | median ms | p90 ms | ms / window | compute s / audio s | "
        "GFLOP/s | % of matmul | % of ORT GEMM | speed-up vs eager |",
        "|---" * 10 + "|",
    ]
    for r in sorted(rows, key=lambda r: (r["batch"], CONTENDERS.index(r["contender"]))):
        lines.append(
            f"| {r['contender']} | {r['batch']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['ms_per_window']:.1f} | {r['compute_s_per_audio_s']:.3f} | {r['gflops']:.1f} | "
            f"{r['pct_of_matmul']:.1f} | {r['pct_of_ort_gemm']:.1f} | "
            f"{r['speedup_vs_torch_eager']:.2f}x |"
        )
    return "\n".join(lines)


def machine_info(threads: int) -> dict[str, Any]:
    from models.export import library_versions

    fields: dict[str, str] = {}
    try:  # first processor's entry; cloud VMs may mask the model name ("AMD EPYC"), so the
        # family/model numbers are kept too (AMD family 25 = Zen 3/4, 26 = Zen 5)
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:  # not Linux: the platform string has to do
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    flags = set(fields.get("flags", "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {**library_versions(), "numpy": np.__version__},
    }


def pyplot() -> Any | None:
    """matplotlib.pyplot on the headless Agg backend (no display on servers or in CI); None
    when matplotlib is not installed (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt: Any, fig: Any, ax: Any, path: Path, title: str) -> None:
    """The benchmarks' common finish: a small title, the legend, a tight 120 dpi PNG."""
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Grouped bars of ms per window; False (and no file) when matplotlib is not installed."""
    if (plt := pyplot()) is None:
        return False
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / len(batches)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, batch in enumerate(batches):
        values = [
            next(
                (r["ms_per_window"] for r in rows if r["contender"] == c and r["batch"] == batch),
                0.0,
            )
            for c in CONTENDERS
        ]
        offsets = np.arange(len(CONTENDERS)) - 0.4 + width * (index + 0.5)
        ax.bar_label(ax.bar(offsets, values, width, label=f"batch {batch}"), fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(CONTENDERS)), CONTENDERS)
    ax.set(ylabel="ms per window (median)")
    save_figure(plt, fig, ax, path, title)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="base-random (default) or tiny-random (default with --quick)"
    )
    parser.add_argument("--chunk", type=float, default=1.0, help="new audio per window, s")
    parser.add_argument("--context", type=float, default=1.0, help="left context per window, s")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, help="timed runs per case (default 20)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="tiny-random model, 5 runs, batch 1")
    parser.add_argument(
        "--out",
        help="JSON path (default benchmarks/results/analysis_kernels-"
        "<model>.json); the PNG goes beside it",
    )
    args = parser.parse_args(argv)
    model = args.model or ("tiny-random" if args.quick else "base-random")
    runs = args.runs or (5 if args.quick else 20)
    batches = args.batch or ([1] if args.quick else [1, 4])
    samples = round((args.chunk + args.context) * RATE)
    if runs < 1 or min(batches) < 1 or args.chunk <= 0 or args.context < 0:
        parser.error("--runs and --batch must be >= 1, --chunk > 0, --context >= 0")
    torch.set_num_threads(args.threads)

    from models.export import ensure_artifact
    from models.presets import resolve_model
    from models.wav2vec2 import EncoderWrapper, TorchForward, encoder_inputs
    from models.wav2vec2_checkpoint import load_torch_model
    from models.wav2vec2_runtime import Wav2Vec2Graphs

    # Artifacts first: an export (minutes for base) must not happen between timed contenders.
    artifacts = {v: ensure_artifact(model, v) for v in ("fp32", "fp32-opt", "int8")}
    progress(f"timing a {args.matmul_size}^2 fp32 matmul in torch and ORT (reference peak)...")
    gemm = gemm_references(args.matmul_size, 5 if args.quick else 10, args.threads)
    progress(f"loading {model} in PyTorch, counting FLOPs of a {samples}-sample window...")
    loaded = load_torch_model(resolve_model(model))
    wrapper = TorchForward(loaded).eval()
    chunk_samples = round(args.chunk * RATE)
    whole_flops = count_flops(lambda audio, w=wrapper: w(torch.from_numpy(audio)), samples)
    # With reuse the encoder runs over the new frames' samples only (see reused_forward).
    encoder = EncoderWrapper(loaded).eval()

    def encode(audio: np.ndarray, encoder: EncoderWrapper = encoder) -> object:
        return encoder(*(torch.from_numpy(v) for v in encoder_inputs(encoder, audio).values()))

    saved = count_flops(encode, samples) - count_flops(encode, chunk_samples + 80)
    flops = {c: whole_flops - (saved if c.endswith("+reuse") else 0) for c in CONTENDERS}
    with torch.inference_mode():  # from_numpy shares memory: ~1 us per call, not timed apart
        times = {
            "torch-eager": time_batches(
                "torch-eager", lambda x, w=wrapper: w(torch.from_numpy(x)), batches, samples, runs
            )
        }
    del wrapper, encoder, loaded  # ~400 MB for base: not needed while ORT runs
    gc.collect()
    for variant, artifact in artifacts.items():
        graphs = Wav2Vec2Graphs(artifact.folder, args.threads, "cpu")
        times[f"ort-{variant}"] = time_batches(f"ort-{variant}", graphs.run, batches, samples, runs)
        if variant == "int8":
            times["ort-int8+reuse"] = time_batches(
                "ort-int8+reuse", reused_forward(graphs, samples, chunk_samples), batches,
                samples, runs,
            )  # fmt: skip
        del graphs  # one model (up to ~400 MB of weights plus arenas) alive at a time
        gc.collect()
    rows = make_rows(times, flops, args.chunk, gemm)
    machine = machine_info(args.threads)
    # Our own threads add ~`threads` to the 1-min load; more than that means other work shared
    # the cores and inflated the times (the machine is shared with other jobs).
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux

    print(
        f"\n{model}: {args.context:g} s context + {args.chunk:g} s chunk = {samples} samples "
        f"per window, {whole_flops / 1e9:.2f} GFLOP per window (matmul + conv, 2 x MACs; "
        f"{(whole_flops - saved) / 1e9:.2f} with feature reuse), "
        f"{args.threads} threads, median of {runs} runs after {WARMUPS} warm-ups\n"
    )
    print(table(rows))
    print()
    for name, ref in gemm.items():
        print(
            f"matmul reference ({name}): {ref['size']}x{ref['size']} @ {ref['size']}x"
            f"{ref['size']} fp32, {ref['median_ms']:.1f} ms, {ref['gflops']:.1f} GFLOP/s"
        )
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    print(
        f"machine: {machine['cpu']} ({', '.join(machine['isa']) or 'no AVX flags'}), "
        f"{machine['usable_cpus']} usable of {machine['logical_cpus']} logical CPUs, "
        f"{args.threads} threads; {versions}; peak RSS {peak_rss_mb:.0f} MB"
    )
    if load > args.threads + 0.5:
        print(
            f"WARNING: 1-min load average {load:.2f} with {args.threads} benchmark threads: "
            "other processes competed for the CPU, timings are likely inflated"
        )
    if any(r["contender"] == "ort-int8" and r["batch"] > 1 for r in rows):
        print(f"note: {INT8_NOTE}")

    out = Path(args.out or f"benchmarks/results/analysis_kernels-{model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": model, "chunk_seconds": args.chunk, "context_seconds": args.context,
        "window_samples": samples, "threads": args.threads, "runs": runs, "warmups": WARMUPS,
        "flops_per_window": whole_flops, "flops_per_window_with_reuse": whole_flops - saved,
        "flops_counted": "torch.utils.flop_counter.FlopCounterMode: matmul + convolution only, "
                         "2 x multiply-accumulates, batch 1 (linear in batch)",
        "matmul_reference": gemm["torch"], "ort_matmul_reference": gemm["onnxruntime"],
        "machine": machine, "peak_rss_mb": round(peak_rss_mb),
        "load_average_1min_at_end": round(load, 2),
        "artifacts": {v: {"path": str(a.folder), "file_sizes": a.meta.get("file_sizes"),
                          "fused_operators": a.meta.get("fused_operators")}
                      for v, a in artifacts.items()},
        "int8_note": INT8_NOTE, "rows": rows,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    png = out.with_suffix(".png")
    title = f"{model}, {samples / RATE:g} s windows, {args.threads} threads: {machine['cpu']}"
    print(f"wrote {png}" if plot(rows, png, title) else "matplotlib is not installed: no chart")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
