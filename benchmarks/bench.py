"""`grym-stream bench` (also `python -m benchmarks`): the server measured as its users meet it.

Every part runs a real server process (`python -m stream serve` on an ephemeral port) and talks
to it through the public protocol only (benchmarks/load.py), except the kernel timings, which
time the analysis model itself:

1. kernels: real-time factor of one analysis window per model variant (PyTorch eager, ONNX
   Runtime fp32, fp32-opt, int8, int8 with feature reuse) and the share of this machine's matmul
   throughput each achieves (benchmarks/analysis_kernels.py).
2. sweep: 1, 2, 4, 8, ... live-paced WebSocket sessions until p95 end-to-end latency passes the
   budget or sessions fall behind real time (chunks skipped or missing); one level between the
   last sustained and the first failed one is tried too. Per level: latency percentiles, each
   stage's mean (the events carry `timing`), and the server's event-loop lag.
3. transports: the same load over WebSocket and over WebRTC (Opus), and the floor: one round
   trip of each 20 ms frame through a bare `websockets` echo server (benchmarks/echo.py).
4. generation: per generator (the `tiny` preset, the AudioLDM-S architecture with random
   weights), clips alone on the server against diffusers' recipe, and live sessions' analysis
   latency without and with a session that generates back to back (benchmarks/bench_generation.py).
5. continuous: per generator, one continuous stream beside the live sessions: its real-time
   factor, whether it stayed ahead of playback, the steps and hop it settled on, how audible its
   joins are, and the analysis latency beside it (benchmarks/bench_continuous.py).
6. ray (only when named: `--sections ray`): the same models on Ray Serve (`--inference ray`, one
   analysis replica on a throwaway one-node cluster) against in-process inference, in one run:
   each window's overhead and each server's capacity (benchmarks/ray_serve.py).

Writes bench.json (every number, machine and library versions, settings), bench.md (tables)
and PNG plots into --out; `--compare A.json B.json` prints B's headline figures over A's.

    grym-stream bench                      # the full run (about 20 minutes on 2 cores)
    grym-stream bench --quick              # tiny models, seconds of audio: proves the tool works
    grym-stream bench --sections ray       # Ray Serve against in-process (needs the ray extra)
    grym-stream bench --compare old.json new.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import bench_continuous, ray_serve, report
from benchmarks.analysis_kernels import machine_info
from benchmarks.bench_generation import run_generation
from benchmarks.echo import echo_server
from benchmarks.echo import measure as measure_echo
from benchmarks.load import progress, run_level, session_config, sustained
from benchmarks.server import analysis_flags, serving

SECTIONS = ("kernels", "sweep", "transports", "generation", "continuous", "ray")
DEFAULT_SECTIONS = SECTIONS[:5]  # ray: only when named (it needs Ray, and a cluster of its own)


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    with serving(args, *analysis_flags(args), "--generator", "none") as url:
        return sweep_levels(url, args)


def sweep_levels(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Doubling levels of live sessions on the server at `url` until one fails, then one level
    between (or exactly the `--levels` given, all of them)."""
    rows: list[dict[str, Any]] = []
    if args.levels:
        rows = [_level(url, n, args.seconds, "websocket", args) for n in args.levels]
    else:
        level, failed = 1, None
        while level <= args.max_sessions:
            rows.append(_level(url, level, args.seconds, "websocket", args))
            if not rows[-1]["sustained"]:
                failed = level
                break
            level *= 2
        last_ok = max((r["sessions"] for r in rows if r["sustained"]), default=0)
        if failed and last_ok >= 2 and (between := (last_ok + failed) // 2) > last_ok:
            rows.append(_level(url, between, args.seconds, "websocket", args))
    best = max((r["sessions"] for r in rows if r["sustained"]), default=0)
    return {"budget_ms": args.budget_ms, "rows": sorted(rows, key=lambda r: r["sessions"]),
            "max_sustained_sessions": best}  # fmt: skip


def _level(url: str, sessions: int, seconds: float, transport: str, args: Any) -> dict[str, Any]:
    progress(f"{transport}: {sessions} live session(s) x {seconds:g} s ...")
    row = asyncio.run(
        run_level(url, sessions, seconds, transport, session_config(args), aligned=args.aligned)
    )
    row["sustained"] = sustained(row, args.budget_ms)
    stages = row.get("stages_mean_ms", {})
    progress(
        f"  p50 {row['p50_ms']:.0f} / p95 {row['p95_ms']:.0f} / max {row['max_ms']:.0f} ms, "
        f"inference {stages.get('inference_ms', float('nan')):.0f} ms mean, skipped "
        f"{row['skipped']}, missing {row['missing']}, loop lag p99 <= "
        f"{row['loop_lag'].get('p99_le_ms', float('nan')):g} ms"
        + ("" if row["sustained"] else "  (not sustained)")
    )
    return row


def run_transports(args: argparse.Namespace) -> dict[str, Any]:
    """The same live load over WebSocket and WebRTC, and the echo floor."""
    n = args.transport_sessions
    with serving(args, *analysis_flags(args), "--generator", "none") as url:
        rows = [_level(url, n, args.seconds, t, args) for t in ("websocket", "webrtc")]
    progress(f"echo floor: {n} bare websockets client(s) x {args.seconds:g} s ...")
    with echo_server() as echo_url:
        floor = asyncio.run(measure_echo(echo_url, n, args.seconds))
    progress(f"  round trip p50 {floor['p50_ms']:.2f} / p95 {floor['p95_ms']:.2f} ms")
    return {"sessions": n, "rows": rows, "echo": floor}


def run_kernels(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from benchmarks import analysis_kernels

    path = folder / f"kernels-{args.model}.json"
    argv = ["--model", args.model, "--threads", str(args.threads or 2), "--out", str(path),
            "--batch", "1", "--runs", str(5 if args.quick else 20)]  # fmt: skip
    progress(f"kernels: one window of {args.model} per variant ...")
    analysis_kernels.main(argv)
    kept = json.loads(path.read_text())
    rows = [
        {k: r[k] for k in ("contender", "batch", "median_ms", "compute_s_per_audio_s",
                           "pct_of_matmul", "pct_of_ort_gemm", "speedup_vs_torch_eager")}
        for r in kept["rows"]
    ]  # fmt: skip
    return {"model": args.model, "json": path.name, "rows": rows,
            "matmul_gflops": kept["matmul_reference"]["gflops"]}  # fmt: skip


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "model",
        "variant",
        "threads",
        "budget_ms",
        "seconds",
        "max_sessions",
        "levels",
        "transport_sessions",
        "generators",
        "generation_sessions",
        "generation_threads",
        "economy",
        "clip_seconds",
        "steps",
        "continuous_seconds",
        "quick",
        "sections",
        "serve_args",
        "aligned",
        "url",
        *ray_serve.SETTINGS,
    )
    return {k: getattr(args, k) for k in keys} | {"session_config": session_config(args)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="grym-stream bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="print B's headline figures as ratios over A's, and exit",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, a few seconds per level (for the test suite)",
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS))
    parser.add_argument("--model", help="analysis preset (default base-random; quick: tiny-random)")
    parser.add_argument("--variant", default="int8", choices=["fp32", "fp32-opt", "int8"])
    parser.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime intra-op threads per wav2vec2 worker (default: the server's, 1 per "
        "worker and a worker per core; kernels: 2)",
    )
    parser.add_argument("--budget-ms", type=float, default=500.0, help="p95 latency budget")
    parser.add_argument("--seconds", type=float, help="audio per session and level (default 30)")
    parser.add_argument("--max-sessions", type=int, default=64, help="where doubling stops")
    parser.add_argument(
        "--levels",
        type=int,
        nargs="+",
        help="run exactly these session counts instead (quick: 1 2)",
    )
    parser.add_argument("--transport-sessions", type=int, help="load of the transport comparison")
    parser.add_argument("--generators", nargs="+", help="default: tiny s-random (quick: tiny)")
    parser.add_argument("--generation-sessions", type=int, help="live sessions beside generation")
    parser.add_argument(
        "--generation-threads",
        type=int,
        help="torch threads of the generation worker (default: the server's, one per core)",
    )
    parser.add_argument(
        "--economy",
        action="store_true",
        help="economy mode: sessions ask for 2 s chunks with 0.5 s of left context, and the "
        "server runs the int8 conv encoder (README)",
    )
    parser.add_argument("--clip-seconds", type=float, help="default 5 (quick: 1)")
    parser.add_argument(
        "--continuous-seconds", type=float, help="continuous stream per phase (default 60)"
    )
    parser.add_argument("--steps", type=int, help="denoising steps per clip (default 10)")
    parser.add_argument(
        "--serve-args",
        default="",
        metavar="FLAGS",
        help="more `serve` flags for every server, e.g. "
        "'--analysis-feature-cache on --analysis-batch-max 8'",
    )
    parser.add_argument(
        "--aligned",
        action="store_true",
        help="sessions start together (worst case) instead of staggered",
    )
    parser.add_argument(
        "--url",
        help="measure the server at this ws(s)://.../v1/stream URL as it "
        "runs instead of starting one (model and generator flags do not apply; "
        "kernels still time this machine)",
    )
    parser.add_argument("--out", type=Path, help="folder (default benchmarks/results/bench)")
    ray_serve.add_arguments(parser)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "model": "tiny-random" if quick else "base-random",
        "seconds": 2.0 if quick else 30.0,
        "transport_sessions": 1 if quick else 4,
        "generators": ["tiny"] if quick else ["tiny", "s-random"],
        "generation_sessions": 1 if quick else 4,
        "clip_seconds": 1.0 if quick else 5.0,
        "continuous_seconds": 4.0 if quick else 60.0,
        "steps": 2 if quick else 10,
        "out": Path("benchmarks/results/bench"),
    }
    if args.url and args.generators is None:
        args.generators = ["server"]  # whatever the server at --url runs
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick and not args.levels:
        args.levels = [1, 2]
    ray_serve.defaults(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.compare:
        print(report.compare(*(json.loads(Path(p).read_text()) for p in args.compare)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["grym-stream bench", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(args.threads or 2),
        "settings": settings_of(args),
    }
    progress(f"bench: {', '.join(args.sections)}; results in {args.out}")
    if "kernels" in args.sections:
        result["kernels"] = run_kernels(args, args.out)
    if "sweep" in args.sections:
        result["sweep"] = run_sweep(args)
    if "transports" in args.sections:
        result["transports"] = run_transports(args)
    if "generation" in args.sections:
        result["generation"] = run_generation(args)
    if "continuous" in args.sections:
        result["continuous"] = bench_continuous.run_continuous(args)
    if "ray" in args.sections:
        result["ray"] = ray_serve.run_ray(args)
    result["wall_s"] = round(time.time() - started, 1)
    result["headline"] = (
        report.headline(result) | bench_continuous.headline(result) | ray_serve.headline(result)
    )
    (args.out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    summary = report.markdown(result) + bench_continuous.markdown(result)
    summary += ray_serve.markdown(result)
    (args.out / "bench.md").write_text(summary)
    plots = report.plots(result, args.out) + bench_continuous.plots(result, args.out)
    print("\n" + summary)
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.md'}"
          + "".join(f", {p.name}" for p in plots))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
