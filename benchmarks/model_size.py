"""Analysis cost of the candidate model sizes (models/training/architecture.py) against
today's `tiny`: what each would cost the server per audio second.

Each candidate is built with seeded random weights (the cost does not depend on the weights),
exported and quantised as the server does (int8 artifact), and timed on the server's path for a
stream at its defaults: a 2 s window (1 s of context + 1 s of new audio) with the context's conv
features reused (benchmarks/analysis_kernels.py `reused_forward`), one window at a time, on
--threads threads. The VM's speed drifts by the minute, so the candidates are timed in
interleaved rounds (each round times every candidate, in a rotating order) and each one's cost
is quoted as the median over rounds of its time divided by `tiny`'s in the same round.

    python -m benchmarks.model_size                 # 12 rounds of 20 windows each
    python -m benchmarks.model_size --quick         # tiny and 12-layers, 2 rounds of 3 (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.analysis_kernels import count_flops, progress, reused_forward
from models.base import ANALYSIS_SAMPLE_RATE

RATE = ANALYSIS_SAMPLE_RATE
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "model_size"


def build(architecture: str, folder: Path) -> tuple[int, int]:
    """A random-weight model of `architecture` saved as a checkpoint folder; its parameters and
    the FLOPs of one 2 s window (whole, no reuse)."""
    from transformers import Wav2Vec2ForCTC

    from models.presets import resolve_model
    from models.training.architecture import model_config
    from models.training.train import TOKEN_IDS
    from models.wav2vec2 import TorchForward
    from models.wav2vec2_checkpoint import load_torch_model

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = Wav2Vec2ForCTC(model_config(architecture))
        model.save_pretrained(folder, safe_serialization=True)
        (folder / "vocab.json").write_text(json.dumps(TOKEN_IDS))
    loaded = load_torch_model(resolve_model(str(folder)))
    params = sum(p.numel() for p in loaded.model.parameters())
    wrapper = TorchForward(loaded).eval()
    flops = count_flops(lambda audio: wrapper(torch.from_numpy(audio)), 2 * RATE)
    return params, flops


def main(argv: list[str] | None = None) -> int:
    from models.export import ensure_artifact
    from models.training.architecture import ARCHITECTURES
    from models.wav2vec2_runtime import Wav2Vec2Graphs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=20, help="windows timed per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--architectures", nargs="+", choices=list(ARCHITECTURES))
    parser.add_argument(
        "--quick", action="store_true", help="tiny and 12-layers, 2 rounds of 3 windows"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/model_size.json"))
    args = parser.parse_args(argv)
    rounds, calls = (2, 3) if args.quick else (args.rounds, args.calls)
    torch.set_num_threads(args.threads)
    names = args.architectures or (["tiny", "12-layers"] if args.quick else list(ARCHITECTURES))
    names = ["tiny"] + [n for n in names if n != "tiny"]  # the reference, always timed
    samples, chunk = 2 * RATE, RATE
    built: dict[str, dict[str, Any]] = {}
    runners = {}
    for name in names:
        progress(f"{name}: building, exporting and quantising (cached after the first run)...")
        folder = CACHE / name
        params, flops = build(name, folder)
        artifact = ensure_artifact(str(folder), "int8", progress=False)
        graphs = Wav2Vec2Graphs(artifact.folder, args.threads, "cpu")
        runners[name] = reused_forward(graphs, samples, chunk)
        built[name] = {"params": params, "gflop_per_window": flops / 1e9}
    audio = np.random.default_rng(0).normal(0, 0.1, (1, samples)).astype(np.float32)
    for run in runners.values():  # warm-up: arenas, thread pools, the reuse cache
        for _ in range(3):
            run(audio)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        progress(f"round {r + 1}/{rounds}")
        for name in names[r % len(names) :] + names[: r % len(names)]:
            one = []
            for _ in range(calls):
                start = time.perf_counter()
                runners[name](audio)
                one.append(time.perf_counter() - start)
            times[name].append(float(np.median(one)))
    rows = []
    base = np.asarray(times["tiny"])
    for name in names:
        ms = np.asarray(times[name]) * 1e3
        rows.append({
            "architecture": name, **built[name], "median_ms_per_window": float(np.median(ms)),
            "compute_s_per_audio_s": float(np.median(ms)) / 1e3 * RATE / chunk,
            "cost_vs_tiny": float(np.median(np.asarray(times[name]) / base)),
            "cost_vs_tiny_range": [float(x) for x in np.percentile(times[name] / base, [10, 90])],
            "changes": ARCHITECTURES[name],
        })  # fmt: skip
    print(
        f"\nint8, 1 s chunk + 1 s context with feature reuse, {args.threads} threads, "
        f"{rounds} interleaved rounds of {calls} windows\n"
    )
    print("| architecture | parameters | GFLOP / window | ms / window | x tiny (p10-p90) |")
    print("|---|---|---|---|---|")
    for row in rows:
        low, high = row["cost_vs_tiny_range"]
        print(
            f"| {row['architecture']} | {row['params'] / 1e6:.2f}M | "
            f"{row['gflop_per_window']:.2f} | {row['median_ms_per_window']:.1f} | "
            f"{row['cost_vs_tiny']:.2f} ({low:.2f}-{high:.2f}) |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"rounds": rounds, "calls": calls, "threads": args.threads, "rows": rows}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
