"""The runner: the scenarios in order, progress as they go, then the table, chaos.json and
chaos.md. Exit status 1 when any check misses its target."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.analysis_kernels import machine_info
from benchmarks.chaos.outcome import Outcome, Plan

# In the order they run: each module has `run(plan) -> Outcome` (async) and NEEDS_PROCESS.
SCENARIOS = ("malformed", "admission", "floods", "resume", "worker", "durability", "access")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="grym-stream chaos", description="attack a server and measure that it holds"
    )
    parser.add_argument("--quick", action="store_true", help="every scenario, small (seconds)")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, help="run these scenarios")
    parser.add_argument("--url", help="an existing server's ws:// URL (no process scenarios)")
    parser.add_argument("--out", default="chaos-results", help="folder for chaos.json/.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    plan = Plan(quick=args.quick, url=args.url, seed=args.seed)
    outcomes = [run_scenario(name, plan) for name in (args.only or SCENARIOS)]
    result = {
        "machine": machine_info(threads=2),  # the server's default analysis threads
        "settings": {"quick": args.quick, "url": args.url, "seed": args.seed},
        "scenarios": [o.to_json() for o in outcomes],
        "ok": all(o.ok or o.skipped for o in outcomes),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (out / "chaos.md").write_text(text)
    print(text)
    print(f"wrote {out / 'chaos.json'} and {out / 'chaos.md'}")
    return 0 if result["ok"] else 1


def run_scenario(name: str, plan: Plan) -> Outcome:
    module = importlib.import_module(f"benchmarks.chaos.{name}")
    if plan.url and module.NEEDS_PROCESS:
        return Outcome(name, skipped="needs a server process of its own (not --url)")
    plan.progress(f"{name}: {module.__doc__.strip().splitlines()[0]}")
    began = time.monotonic()
    try:
        outcome: Outcome = asyncio.run(module.run(plan))
    except Exception as exc:  # a scenario that breaks is a failed check, not a lost run
        traceback.print_exc()
        outcome = Outcome(name)
        outcome.check("the scenario ran to the end", f"{type(exc).__name__}: {exc}", "no error",
                      False)  # fmt: skip
    outcome.seconds = round(time.monotonic() - began, 1)
    verdict = "ok" if outcome.ok else "FAILED"
    plan.progress(f"{name}: {verdict} in {outcome.seconds:g} s")
    return outcome


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        f"# grym-stream chaos{' (quick)' if result['settings']['quick'] else ''}",
        "",
        f"{machine.get('cpu', '?')}, {machine.get('usable_cpus', '?')} usable CPUs; "
        f"{'all targets met' if result['ok'] else 'SOME TARGETS MISSED'}",
        "",
        "| scenario | check | measured | target | |",
        "| --- | --- | --- | --- | --- |",
    ]
    for scenario in result["scenarios"]:
        name = scenario["scenario"]
        if scenario["skipped"]:
            lines.append(f"| {name} | skipped: {scenario['skipped']} | | | |")
            continue
        for check in scenario["checks"]:
            mark = "ok" if check["ok"] else "**missed**"
            lines.append(
                f"| {name} | {check['what']} | {check['measured']} | {check['target']} | {mark} |"
            )
            name = ""
    lines.append("")
    for scenario in result["scenarios"]:
        if scenario["summary"]:
            lines.append(f"- **{scenario['scenario']}** ({scenario['seconds']} s): "
                         f"{scenario['summary']}")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
