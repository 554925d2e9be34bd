"""`grym-stream bench --sections ray`: the analysis model on Ray Serve (`--inference ray`) against
the same model in the server's process (`--inference local`), in one run on this machine.

A throwaway one-node Ray cluster (grym/cluster/ray.py) and two server processes with the bench's
analysis settings and no generator are started, and stay up for the whole section: `local`, and
`ray`, which deploys the `wav2vec2-analysis` application (one replica with `--threads` ONNX
Runtime threads, `--ray-batch-wait-ms` at its default) and sends its windows there. Both take
one unmeasured warm-up session first. Then:

1. overhead: the same live-paced load (`--ray-sessions`, default 1 and 4 sessions, `timing`)
   against both, in rounds whose order is reversed each time (a b c d, d c b a), so that the
   machine's drift falls on both alike; events are pooled over the rounds. Per window, from the
   events' `timing.engines.wav2vec2`: `inference_ms` in each (the model run locally; with Ray the
   whole call: the pipe to the bridge process, Ray's RPCs, the replica's batch wait and its model
   run) and their difference at p50/p95, Ray's own split (`remote`: transfer, replica queue,
   replica model run), end-to-end latency, and the CPU time per window of the server's process
   tree and of the Ray cluster's processes (from /proc).
2. capacity: bench's sweep (doubling levels, then one between; `--levels` in quick mode)
   against each server in turn: live sessions sustained within the budget, nothing skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import random
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import CONFIG, progress, speech_like, websocket_session
from benchmarks.server import analysis_flags, server_process
from clients.stream_client import StreamResult, percentile
from grym.cluster.ray import RayCluster
from stream.settings import Settings

SETUPS = ("local", "ray")
SETTINGS = ("ray_sessions", "ray_rounds", "ray_cpus")  # in bench.json's settings
REMOTE = ("transfer_ms", "replica_queue_ms", "replica_inference_ms")
WARM_UP_SECONDS = 2.0
_TICK = os.sysconf("SC_CLK_TCK")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ray section (--sections ray)")
    group.add_argument(
        "--ray-sessions", type=int, nargs="+",
        help="live sessions of the overhead levels (default 1 4; quick: 1)",
    )  # fmt: skip
    group.add_argument(
        "--ray-rounds", type=int,
        help="overhead rounds, the order reversed each time (default 2; quick: 1)",
    )  # fmt: skip
    group.add_argument(
        "--ray-cpus", type=int,
        help="logical CPUs of the throwaway Ray cluster (default max(4, threads + 2))",
    )  # fmt: skip


def defaults(args: argparse.Namespace) -> None:
    if args.ray_sessions is None:
        args.ray_sessions = [1] if args.quick else [1, 4]
    if args.ray_rounds is None:
        args.ray_rounds = 1 if args.quick else 2
    if "ray" in (args.sections or ()) and args.threads is None:
        args.threads = 2  # both servers, local and Ray's replica, on the same 2 threads
    if args.ray_cpus is None:
        args.ray_cpus = max(4, (args.threads or 2) + 2)


def run_ray(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bench import sweep_levels  # (bench imports us)

    if args.url:
        raise SystemExit("grym-stream bench: the ray section starts its own servers and Ray "
                         "cluster; --url does not apply to it")  # fmt: skip
    load_before = os.getloadavg()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the replicas load the model offline too
    flags = [*analysis_flags(args), "--generator", "none"]
    with ExitStack() as stack:  # on any exit: the servers stop, then the cluster
        progress(f"ray: a one-node Ray cluster with {args.ray_cpus} logical CPUs ...")
        cluster = stack.enter_context(RayCluster(cpus=args.ray_cpus))
        ray_flags = ["--inference", "ray", "--ray-address", cluster.address,
                     "--ray-analysis-replicas", "1"]  # fmt: skip
        progress("ray: server `local` (--inference local) ...")
        urls = {"local": stack.enter_context(server_process(*flags))}
        progress("ray: server `ray` (--inference ray: deploys wav2vec2-analysis, 1 replica) ...")
        urls["ray"] = stack.enter_context(server_process(*flags, *ray_flags))
        pids = {"local": _server_pid(ray=False), "ray": _server_pid(ray=True)}
        ray_session = cluster._process.pid if cluster._process else None  # its processes' sid

        progress(f"ray: warm-up, one {WARM_UP_SECONDS:g} s session per server ...")
        asyncio.run(_warm_up(list(urls.values())))
        overhead = _overhead(urls, pids, ray_session, args, progress)
        capacity = {}
        for name in SETUPS:
            progress(f"ray: capacity of `{name}` ...")
            capacity[name] = sweep_levels(urls[name], args)
    best = {name: capacity[name]["max_sustained_sessions"] for name in SETUPS}
    return {
        "ray_version": importlib.metadata.version("ray"),
        "cluster_cpus": args.ray_cpus,
        "replicas": 1,
        "replica_threads": args.threads,
        "batch_wait_ms": Settings.model_fields["ray_batch_wait_ms"].default,
        "server_flags": {
            "local": flags,
            "ray": [*flags, *ray_flags[:3], "HOST:PORT", *ray_flags[4:]],
        },  # fmt: skip
        "overhead": overhead,
        "capacity": capacity,
        "capacity_ratio": best["ray"] / best["local"] if best["local"] else None,
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
    }


# --- overhead ------------------------------------------------------------------------------


def _overhead(
    urls: dict[str, str], pids: dict[str, int | None], ray_session: int | None,
    args: argparse.Namespace, progress: Any,
) -> dict[str, Any]:  # fmt: skip
    order = [(n, name) for n in args.ray_sessions for name in SETUPS]
    pooled: dict[tuple[int, str], dict[str, Any]] = {}
    for number in range(args.ray_rounds):
        for sessions, name in order if number % 2 == 0 else order[::-1]:
            progress(f"ray overhead, round {number + 1}: `{name}`, {sessions} live session(s) "
                     f"x {args.seconds:g} s ...")  # fmt: skip
            before = _cpu(pids[name], ray_session)
            results = asyncio.run(_level(urls[name], sessions, args.seconds))
            after = _cpu(pids[name], ray_session)
            rows = _window_rows(results)
            slot = pooled.setdefault((sessions, name), {"rows": [], "skipped": 0, "missing": 0,
                                                        "errors": 0, "cpu_s": {}})  # fmt: skip
            slot["rows"] += rows
            for key, value in _accounted(results, args.seconds).items():
                slot[key] += value
            for key in after:
                slot["cpu_s"][key] = slot["cpu_s"].get(key, 0.0) + after[key] - before[key]
            inference = [r["inference_ms"] for r in rows]
            progress(f"  inference p50 {percentile(inference, 50):.1f} / p95 "
                     f"{percentile(inference, 95):.1f} ms, latency p50 "
                     f"{percentile([r['latency_ms'] for r in rows], 50):.0f} ms, skipped "
                     f"{slot['skipped']}, missing {slot['missing']}")  # fmt: skip
    levels = []
    for sessions in args.ray_sessions:
        local, ray = (_summary(pooled[(sessions, name)]) for name in SETUPS)
        levels.append({
            "sessions": sessions,
            "local": local,
            "ray": ray,
            # Ray's overhead per window: the difference of the two servers' percentiles
            "overhead_ms": {q: ray["inference_ms"][q] - local["inference_ms"][q]
                            for q in ("p50", "p95", "mean")},
            "latency_added_ms": {q: ray["latency_ms"][q] - local["latency_ms"][q]
                                 for q in ("p50", "p95", "mean")},
            "inference_ratio_p50": ray["inference_ms"]["p50"] / local["inference_ms"]["p50"],
        })  # fmt: skip
    return {"rounds": args.ray_rounds, "seconds": args.seconds, "levels": levels}


async def _warm_up(urls: list[str]) -> None:
    config = {**CONFIG, "timing": False}
    await asyncio.gather(
        *(websocket_session(url, speech_like(WARM_UP_SECONDS, 999), 0.0, config) for url in urls)
    )


async def _level(url: str, sessions: int, seconds: float) -> list[StreamResult]:
    """`sessions` live sessions, as benchmarks/load.py's run_level starts them (the same audio
    and staggered starts for every server), with every event kept."""
    rng = random.Random(sessions)
    period = CONFIG["chunk_seconds"]
    return await asyncio.gather(*(
        websocket_session(url, speech_like(seconds, i),
                          period * (i + rng.uniform(0, 0.2)) / sessions, CONFIG)
        for i in range(sessions)
    ))  # fmt: skip


def _window_rows(results: list[StreamResult]) -> list[dict[str, float]]:
    """Per analysis event: its client-measured latency, and the wav2vec2 engine's own stages
    (the top-level `timing` is that of whichever engine finished last)."""
    rows = []
    for result in results:
        for event in result.analysis:
            engine = (event.get("timing") or {}).get("engines", {}).get("wav2vec2")
            if event.get("client_latency_ms") is None or engine is None:
                continue
            row = {"latency_ms": event["client_latency_ms"], "inference_ms": engine["inference_ms"],
                   "batch": engine["batch"]}  # fmt: skip
            if remote := engine.get("remote"):
                row |= {key: remote[key] for key in REMOTE}
                row["replica_batch"] = remote["replica_batch"]
                # all that Ray adds to the model run: transfer + the replica's batch wait
                row["ray_added_ms"] = engine["inference_ms"] - remote["replica_inference_ms"]
            rows.append(row)
    return rows


def _accounted(results: list[StreamResult], seconds: float) -> dict[str, int]:
    chunks = int(np.ceil(seconds / CONFIG["chunk_seconds"]))
    skipped = [(r.end or {}).get("skipped", 0) for r in results]
    return {
        "skipped": sum(skipped),
        "missing": sum(max(0, chunks - len(r.analysis) - s) for r, s in zip(results, skipped)),
        "errors": sum(len(r.errors) for r in results),
    }


def _summary(slot: dict[str, Any]) -> dict[str, Any]:
    rows = slot["rows"]
    out: dict[str, Any] = {k: slot[k] for k in ("skipped", "missing", "errors")}
    out["events"] = len(rows)
    for key in ("latency_ms", "inference_ms", *REMOTE, "ray_added_ms", "batch", "replica_batch"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = {"p50": percentile(values, 50), "p95": percentile(values, 95),
                        "mean": float(np.mean(values))}  # fmt: skip
    # CPU time per analysed window: the server's process tree (with `ray`: its bridge process
    # too) and the Ray cluster's processes (the replica's model run among them), in ms
    out["cpu_ms_per_window"] = {
        key: 1000 * seconds / len(rows) if rows else None for key, seconds in slot["cpu_s"].items()
    }
    out["inference_values_ms"] = [r["inference_ms"] for r in rows]
    return out


# --- CPU time, from /proc --------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # from the state on (the name may hold spaces)


def _processes() -> Iterator[tuple[int, list[str]]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            yield int(entry.name), fields


def _cpu(server: int | None, ray_session: int | None) -> dict[str, float]:
    """CPU seconds (user + system) so far of the server's process tree and of every process in
    the Ray cluster's session (processes that already exited are not counted)."""
    table = dict(_processes())
    tree, grew = {server}, True
    while grew:
        children = {pid for pid, f in table.items() if int(f[1]) in tree} - tree
        tree |= children
        grew = bool(children)

    def seconds(pids: Any) -> float:
        return sum(int(table[p][11]) + int(table[p][12]) for p in pids if p in table) / _TICK

    out = {} if server is None else {"server": seconds(tree)}
    if ray_session is not None:
        out["ray_cluster"] = seconds(p for p, f in table.items() if int(f[3]) == ray_session)
    return out


def _server_pid(ray: bool) -> int | None:
    """The `python -m stream serve` child of this process with (or without) `--inference ray`."""
    me = os.getpid()
    for pid, fields in _processes():
        if int(fields[1]) != me:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "serve" in argv and "stream" in argv and ("ray" in argv) == ray:
            return pid
    return None


# --- what bench.json and bench.md get ------------------------------------------------------


def headline(result: dict[str, Any]) -> dict[str, Any]:
    if not (ray := result.get("ray")):
        return {}
    out: dict[str, Any] = {}
    for level in ray["overhead"]["levels"]:
        n = level["sessions"]
        out[f"ray_overhead_p50_ms_{n}_sessions"] = level["overhead_ms"]["p50"]
        out[f"ray_overhead_p95_ms_{n}_sessions"] = level["overhead_ms"]["p95"]
    for name in SETUPS:
        out[f"ray_section_max_sustained_{name}"] = ray["capacity"][name]["max_sustained_sessions"]
    return out


def _total(cpu: dict[str, float | None]) -> float:
    return sum(v for v in cpu.values() if v is not None)


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _q(summary: dict[str, Any], key: str, q: str, digits: int = 1) -> str:
    return _f(summary.get(key, {}).get(q), digits)


def markdown(result: dict[str, Any]) -> str:
    if not (ray := result.get("ray")):
        return ""
    s, o = result["settings"], ray["overhead"]
    lines = [
        "",
        "## Models on Ray Serve (`--inference ray`): one analysis replica against in-process",
        "",
        f"Ray {ray['ray_version']}, a one-node cluster on this machine ({ray['cluster_cpus']} "
        f"logical CPUs); the replica runs `{s['model']}` {s['variant']} on "
        f"{ray['replica_threads']} ONNX Runtime threads, replica batch wait "
        f"{ray['batch_wait_ms']:g} ms. Both servers and the cluster are up for the whole "
        f"section. Overhead: {o['rounds']} round(s) of {o['seconds']:g} s per level, the order "
        "reversed each round, events pooled.",
        "",
        "Per window, wav2vec2's inference stage (`timing.engines.wav2vec2.inference_ms`: locally "
        "the model run; with Ray the whole call), ms:",
        "",
        "| sessions | events local / ray | p50 local | p50 ray | p50 ray - local | p95 local | "
        "p95 ray | p95 ray - local | ray / local p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for lv in o["levels"]:
        lo, ra, d = lv["local"], lv["ray"], lv["overhead_ms"]
        lines.append(
            f"| {lv['sessions']} | {lo['events']} / {ra['events']} | "
            f"{_q(lo, 'inference_ms', 'p50')} | {_q(ra, 'inference_ms', 'p50')} | "
            f"{d['p50']:+.1f} | {_q(lo, 'inference_ms', 'p95')} | "
            f"{_q(ra, 'inference_ms', 'p95')} | {d['p95']:+.1f} | "
            f"{_f(lv['inference_ratio_p50'], 2)}x |"
        )
    lines += [
        "",
        "Where a Ray call's time goes (`timing.engines.wav2vec2.remote`), and end to end, ms:",
        "",
        "| sessions | transfer p50 / p95 | replica queue p50 / p95 | replica model run p50 / "
        "p95 | Ray's share (call - model run) p50 / p95 | replica batch mean | latency p50 "
        "local / ray | latency p95 local / ray |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for lv in o["levels"]:
        lo, ra = lv["local"], lv["ray"]
        cells = " | ".join(
            f"{_q(ra, k, 'p50')} / {_q(ra, k, 'p95')}" for k in (*REMOTE, "ray_added_ms")
        )
        lines.append(
            f"| {lv['sessions']} | {cells} | {_q(ra, 'replica_batch', 'mean', 2)} | "
            f"{_q(lo, 'latency_ms', 'p50', 0)} / {_q(ra, 'latency_ms', 'p50', 0)} | "
            f"{_q(lo, 'latency_ms', 'p95', 0)} / {_q(ra, 'latency_ms', 'p95', 0)} |"
        )
    lines += [
        "",
        "CPU time per window (user + system, from /proc), ms: the server's process tree (with "
        "`ray`: its bridge process too) and the Ray cluster's processes (with `local`: idle):",
        "",
        "| sessions | local: server | local: Ray's processes | ray: server + bridge | ray: Ray's "
        "processes | all processes, ray - local |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for lv in o["levels"]:
        lo, ra = lv["local"]["cpu_ms_per_window"], lv["ray"]["cpu_ms_per_window"]
        lines.append(
            f"| {lv['sessions']} | {_f(lo.get('server'))} | {_f(lo.get('ray_cluster'))} | "
            f"{_f(ra.get('server'))} | {_f(ra.get('ray_cluster'))} | "
            f"{_f(_total(ra) - _total(lo))} |"
        )
    cap = ray["capacity"]
    lines += [
        "",
        f"Capacity: live sessions sustained (p95 <= {s['budget_ms']:g} ms, nothing skipped or "
        f"missing), ray / local = {_f(ray['capacity_ratio'], 2)}:",
        "",
        "| inference | sessions | events | p50 ms | p95 ms | max ms | skipped | missing | "
        "inference mean ms | sustained |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name in SETUPS:
        for r in cap[name]["rows"]:
            inference = r.get("stages_mean_ms", {}).get("inference_ms")
            lines.append(
                f"| {name} | {r['sessions']} | {r['events']} | {_f(r['p50_ms'], 0)} | "
                f"{_f(r['p95_ms'], 0)} | {_f(r['max_ms'], 0)} | {r['skipped']} | "
                f"{r['missing']} | {_f(inference)} | {'yes' if r['sustained'] else 'no'} |"
            )
    lines += [
        "",
        "| inference | live sessions sustained |",
        "|---|---|",
        *(f"| {name} | **{cap[name]['max_sustained_sessions']}** |" for name in SETUPS),
        "",
    ]  # fmt: skip
    return "\n".join(lines)
