"""The report: the headline numbers and scaleout.md, both from the result dict alone (so the
markdown can be rendered again from a committed scaleout.json)."""

from __future__ import annotations

from typing import Any


def headline(result: dict[str, Any]) -> dict[str, float]:
    share, fail = result["latency"]["shares"], result["failover"]
    writes = result["writes"]["per_session"]
    return {
        "postgresql_share_p50_ms": share["postgresql"]["p50_ms"],
        "balancer_share_p50_ms": share["balancer"]["p50_ms"],
        "balancer_share_transport_ms": share["balancer"]["transport_mean_ms"],
        "transactions_per_s_per_session": writes["transactions_per_s"],
        "rows_per_s_per_session": writes["rows_per_s"],
        "wal_kb_per_s_per_session": writes["wal_kb_per_s"],
        "sigkill_to_first_event_s": fail["sigkill"]["median_to_first_event_s"],
        "sigterm_to_first_event_s": fail["sigterm"]["median_to_first_event_s"],
    }


def markdown(result: dict[str, Any]) -> str:
    lat, fail, s = result["latency"], result["failover"], result["settings"]
    setups, share = lat["setups"], lat["shares"]
    quick = " (quick)" if s["quick"] else ""
    lines = [
        f"# Scale-out on one machine{quick} ({result['created']})",
        "",
        f"`{result['command']}`: {result['wall_s']:g} s. Machine: {result['machine']['cpu']}, "
        f"{result['machine']['usable_cpus']} usable CPUs. Analysis: `{s['model']}` "
        f"{s['variant']} on {s['threads']} ONNX Runtime threads per front-end; sessions: 1 s "
        f"chunks + 1 s left context, 16 kHz s16, live-paced, staggered starts.",
        "",
        f"## Latency per event: {lat['sessions']} live sessions x {lat['seconds']:g} s, "
        f"{lat['rounds']} round(s) per setup",
        "",
        "| setup | events | p50 ms | p95 ms | mean ms | server mean ms | transport mean ms "
        "| all but inference p50 ms | skipped | missing | sessions whole |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in setups.items():
        lines.append(
            f"| ({key}) {row['what']} | {row['events']} | {row['p50_ms']:.1f} | "
            f"{row['p95_ms']:.1f} | {row['mean_ms']:.1f} | {row['server_mean_ms']:.1f} | "
            f"{row['transport_mean_ms']:.2f} | {row['beside_p50_ms']:.1f} | {row['skipped']} | "
            f"{row['missing']} | "
            f"{row['sessions_whole']}/{row['sessions_run']} |"
        )
    lines += [
        "",
        "| share of latency per event | p50 ms | p95 ms | server mean ms | transport mean ms "
        "| all but inference p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, (label, pair) in {
        "postgresql": ("PostgreSQL instead of SQLite", "b - a"),
        "balancer": ("HAProxy in front", "c - b"),
        "second_frontend": ("a second front-end on the same cores", "d - c"),
    }.items():
        d = share[name]
        lines.append(
            f"| {label} ({pair}) | {d['p50_ms']:+.1f} | {d['p95_ms']:+.1f} | "
            f"{d['server_mean_ms']:+.1f} | {d['transport_mean_ms']:+.2f} | "
            f"{d['beside_p50_ms']:+.1f} |"
        )
    lines += [
        "",
        "## PostgreSQL's work per live session",
        "",
        "| measured during | window s | session-seconds | transactions/s | rows/s "
        "| inserted/s | updated/s | WAL KB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("b", "d"):
        w = setups[key]["writes"]
        if not w:
            continue
        p = w["per_session"]
        lines.append(
            f"| ({key}) {setups[key]['what']} | {w['window_s']:.1f} | {w['session_seconds']:.1f}"
            f" | {p['transactions_per_s']:.2f} | {p['rows_per_s']:.2f} | "
            f"{p['inserted_per_s']:.2f} | {p['updated_per_s']:.2f} | {p['wal_kb_per_s']:.2f} |"
        )
    e = result["writes"]["estimate"]
    by_table = ", ".join(f"{k} {v:.2f}" for k, v in result["writes"]["rows_per_s_by_table"].items())
    lines += [
        "",
        f"Rows written per session-second, by table (both windows): {by_table}.",
        "",
        "What the store holds after the load (indexes and TOAST included): "
        + ", ".join(
            f"{name} {t['rows']:,} rows, {t['bytes'] / 1024:,.0f} KB"
            + (f" ({t['bytes_per_row'] / 1024:.1f} KB a row)" if t["rows"] else "")
            for name, t in lat["store_after"].items()
            if t["bytes"] > 16384
        )
        + ".",
        "",
        f"On paper, {e['sessions']:,} concurrent sessions at these rates: "
        f"{e['transactions_per_s']:,.0f} transactions/s, {e['rows_per_s']:,.0f} rows/s, "
        f"{e['wal_mb_per_s']:.1f} MB/s of WAL ({e['wal_gb_per_hour']:.0f} GB/hour)"
        + (
            f"; analysis at the bench's {e['bench_sessions']} sessions per "
            f"{e['bench_cpus']} cores: {e['cores']:,} cores "
            f"({e['frontends_of_16_cores']} front-ends of 16 cores)."
            if "cores" in e
            else "."
        ),
        "",
        f"## Time to resume on another front-end (lease {fail['lease_seconds']:g} s, "
        f"drain {fail['drain_seconds']:g} s, balancer checks every {fail['check_inter']})",
        "",
        "| signal | run | from -> to | signal -> ready s | signal -> first analysis event s "
        "| signal -> first new chunk s | all samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for how in ("sigkill", "sigterm"):
        part = fail[how]
        for i, run in enumerate(part["runs"]):
            lines.append(
                f"| {run['signal']} | {i + 1} | {run['from']} -> {run['to']} | "
                f"{run['to_ready_s']:.2f} | {run['to_first_event_s']:.2f} | "
                f"{run['to_first_new_chunk_s']:.2f} | {'yes' if run['whole'] else 'no'} |"
            )
        lines.append(
            f"| {how.upper()} | median | | {part['median_to_ready_s']:.2f} | "
            f"{part['median_to_first_event_s']:.2f} | {part['median_to_first_new_chunk_s']:.2f} |"
            " |"
        )
    return "\n".join(lines) + "\n"
