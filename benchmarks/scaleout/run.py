"""The runner: the command line, the three parts in order on one PostgreSQL, then
scaleout.json and scaleout.md."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchmarks.scaleout
from benchmarks.analysis_kernels import machine_info
from benchmarks.load import CONFIG, progress
from benchmarks.scaleout.failover import run_failover
from benchmarks.scaleout.latency import run_latency
from benchmarks.scaleout.report import headline, markdown
from benchmarks.scaleout.writes import estimate, write_rates
from grym.cluster.postgres import Postgres

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTION = (benchmarks.scaleout.__doc__ or "").splitlines()[0]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaleout", description=DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="tiny model, seconds of audio (tests)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scaleout"))
    p.add_argument("--model", help="analysis preset (default base-random; quick: tiny-random)")
    p.add_argument("--variant", default="int8", choices=["fp32", "fp32-opt", "int8"])
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per front-end")
    p.add_argument("--sessions", type=int, help="live sessions per setup (4; quick: 2)")
    p.add_argument("--seconds", type=float, help="audio per session (20; quick: 3)")
    p.add_argument("--rounds", type=int, help="rounds of the setups (2; quick: 1)")
    p.add_argument("--repeats", type=int, help="failovers per signal (3; quick: 1)")
    p.add_argument("--lease-seconds", type=float, default=2.0, help="failover front-ends' lease")
    p.add_argument("--drain-seconds", type=float, default=1.0, help="and their drain")
    p.add_argument("--kill-after", type=float, help="seconds into the session (4; quick: 2.5)")
    p.add_argument("--failover-seconds", type=float, help="audio of it (12; quick: 7)")
    args = p.parse_args(argv)
    defaults = {"model": "tiny-random" if args.quick else "base-random",
                "sessions": 2 if args.quick else 4, "seconds": 3.0 if args.quick else 20.0,
                "rounds": 1 if args.quick else 2, "repeats": 1 if args.quick else 3,
                "kill_after": 2.5 if args.quick else 4.0,
                "failover_seconds": 7.0 if args.quick else 12.0}  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    bench_json = ROOT / "benchmarks" / "results" / "bench" / "bench.json"
    bench = json.loads(bench_json.read_text()) if bench_json.exists() else None
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m benchmarks.scaleout",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(args.threads),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"session_config": CONFIG},
    }  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="grym-scaleout-"))
    try:
        progress(f"scale-out: starting PostgreSQL; results in {args.out}")
        with Postgres() as pg:  # its own folder: the postgres user must reach it
            result["latency"] = run_latency(args, folder, pg)
            setups = result["latency"]["setups"]
            windows = [w for key in ("b", "d") for w in
                       (r.get("db_window") for r in setups[key]["rounds"]) if w]  # fmt: skip
            per = write_rates(windows)
            result["writes"] = {**per, "estimate": estimate(per["per_session"], bench)}
            result["failover"] = run_failover(args, folder, pg.url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["wall_s"] = round(time.time() - began, 1)
    result["headline"] = headline(result)
    (args.out / "scaleout.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / "scaleout.md").write_text(text)
    print("\n" + text)
    print(f"wrote {args.out / 'scaleout.json'}, {args.out / 'scaleout.md'}")
    return 0
