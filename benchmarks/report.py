"""What `grym-stream bench` writes from its JSON: headline figures, Markdown tables, PNG plots,
and the comparison of two runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.load import STAGES

STAGE_LABELS = {
    "transport_ms": "transport (client <-> server)", "decode_ms": "decode + chunk",
    "backlog_ms": "session backlog", "queue_ms": "engine queue", "batch_wait_ms": "batch wait",
    "inference_ms": "inference", "post_ms": "merge + steps", "send_ms": "outbox",
}  # fmt: skip


def fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a reader looks for first (and `--compare` divides)."""
    out: dict[str, Any] = {}
    if sweep := result.get("sweep"):
        out["max_sustained_sessions"] = sweep["max_sustained_sessions"]
        if sweep["rows"]:
            first = sweep["rows"][0]
            out["p50_ms_1_session"] = first["p50_ms"]
            out["p95_ms_1_session"] = first["p95_ms"]
        ok = [r for r in sweep["rows"] if r["sustained"]]
        if ok:
            out["p95_ms_at_max_sustained"] = ok[-1]["p95_ms"]
        lags = [r["loop_lag"].get("p99_le_ms") for r in sweep["rows"]]
        out["loop_lag_p99_le_ms_worst"] = max((x for x in lags if x is not None), default=None)
    if kernels := result.get("kernels"):
        for r in kernels["rows"]:
            out[f"rtf_{r['contender']}"] = r["compute_s_per_audio_s"]
    if transports := result.get("transports"):
        for r in transports["rows"]:
            out[f"p50_ms_{r['transport']}"] = r["p50_ms"]
            out[f"transport_p50_ms_{r['transport']}"] = _stage_p50(r)
        out["echo_round_trip_p50_ms"] = transports["echo"]["p50_ms"]
    if generation := result.get("generation"):
        for name, g in generation["generators"].items():
            out[f"first_audio_s_{name}"] = g["first_audio_s"]
            out[f"clip_total_s_{name}"] = g["total_s"]
            idle, busy = g["phases"]["idle"], g["phases"]["generating"]
            out[f"analysis_p95_ms_idle_{name}"] = idle["p95_ms"]
            out[f"analysis_p95_ms_generating_{name}"] = busy["p95_ms"]
            if alone := g.get("alone"):
                out[f"clip_total_s_alone_{name}"] = alone["total_s"]
                after = alone["first_audio_after_denoising_s"]
                out[f"first_audio_after_denoising_s_{name}"] = after
                if speedup := _speedup(g):
                    out[f"speedup_vs_diffusers_{name}"] = speedup
            if streaming := g.get("alone_streaming"):
                out[f"clip_total_s_alone_streaming_{name}"] = streaming["total_s"]
    return out


def _speedup(generator: dict[str, Any], phase: str = "alone") -> float | None:
    """diffusers' recipe total over the server's clip total on an idle server (same run)."""
    reference, alone = generator.get("diffusers"), generator.get(phase)
    if not reference or not alone or not alone["clips"]:
        return None
    return reference["total_s"] / alone["total_s"]


def readme_table(result: dict[str, Any]) -> str:
    """The headline figures as the README quotes them (a test checks that it still does)."""
    h, s = result["headline"], result["settings"]
    lines = ["| figure (`grym-stream bench`) | measured |", "|---|---|"]
    if "max_sustained_sessions" in h:
        lines.append(
            f"| live sessions sustained ({s['model']} {s['variant']}, p95 <= "
            f"{s['budget_ms']:g} ms, nothing skipped) | **{h['max_sustained_sessions']}** "
            f"(p95 {fmt(h.get('p95_ms_at_max_sustained'))} ms) |"
        )
        lines.append(
            f"| analysis latency, 1 session, p50 / p95 | {fmt(h['p50_ms_1_session'])} / "
            f"{fmt(h['p95_ms_1_session'])} ms |"
        )
        lines.append(
            f"| server event-loop lag p99, worst sweep level | <= "
            f"{fmt(h['loop_lag_p99_le_ms_worst'])} ms |"
        )
    if "kernels" in result:
        cells = ", ".join(
            f"{r['contender'].removeprefix('ort-')} {fmt(r['compute_s_per_audio_s'], 3)}"
            for r in result["kernels"]["rows"]
        )
        lines.append(f"| compute s per audio s ({result['kernels']['model']}) | {cells} |")
    if t := result.get("transports"):
        ws, rtc = (
            next(r for r in t["rows"] if r["transport"] == n) for n in ("websocket", "webrtc")
        )
        lines.append(
            f"| p50 latency at {t['sessions']} sessions, WebSocket / WebRTC | {fmt(ws['p50_ms'])}"
            f" / {fmt(rtc['p50_ms'])} ms (transport share {fmt(_stage_p50(ws), 1)} / "
            f"{fmt(_stage_p50(rtc), 1)} ms; bare echo round trip "
            f"{fmt(t['echo']['p50_ms'], 1)} ms) |"
        )
    if g := result.get("generation"):
        clip = g["clip"]
        for name, r in g["generators"].items():
            idle, busy = r["phases"]["idle"], r["phases"]["generating"]
            lines.append(
                f"| generation `{name}`, {clip['seconds']:g} s clip, {clip['steps']} steps: first "
                f"audio / total | {fmt(r['first_audio_s'], 2)} / {fmt(r['total_s'], 2)} s; "
                f"analysis p95 {fmt(idle['p95_ms'])} -> {fmt(busy['p95_ms'])} ms while generating |"
            )
            if speedup := _speedup(r):
                alone = r["alone"]
                lines.append(
                    f"| generation `{name}` on an idle server: total, first audio after the "
                    f"last denoising step; vs diffusers' recipe | {fmt(alone['total_s'], 2)} s, "
                    f"{fmt(alone['first_audio_after_denoising_s'], 2)} s; {speedup:.2f}x |"
                )
    return "\n".join(lines)


def _stage_p50(row: dict[str, Any]) -> float | None:
    return row.get("stages_p50_ms", {}).get("transport_ms")


def _machine(result: dict[str, Any]) -> str:
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (f"{m['cpu']}, {m['usable_cpus']} usable CPUs ({', '.join(m['isa']) or 'no AVX'}); "
            f"{m['platform']}; Python {m['python']}; {versions}")  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"# grym-stream bench ({result['created']})", "",
        f"`{result['command']}`: {result['wall_s']:.0f} s. Machine: {_machine(result)}.", "",
        f"Analysis: `{s['model']}` {s['variant']}, "
        + (f"{s['threads']} ONNX Runtime threads per worker" if s.get("threads") else
           "the server's default layout (a worker per core, 1 ONNX Runtime thread each)")
        + (", int8 conv encoder (economy mode)" if s.get("economy") else "")
        + "; "
        f"sessions: {s['session_config']['chunk_seconds']:g} s chunks + "
        f"{s['session_config']['left_context_seconds']:g} s left context, 16 kHz s16, "
        "live-paced, staggered starts; "
        f"budget p95 <= {s['budget_ms']:g} ms." + (" **Quick mode: tiny models, numbers "
        "prove the tool works, nothing more.**" if s["quick"] else ""), "",
    ]  # fmt: skip
    if k := result.get("kernels"):
        lines += [
            f"## Kernels: one {k['model']} window (2 s), batch 1", "",
            "| variant | median ms | compute s / audio s | % of torch matmul | "
            "% of ORT GEMM | vs eager |", "|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in k["rows"]:
            lines.append(
                f"| {r['contender']} | {fmt(r['median_ms'], 1)} | "
                f"{fmt(r['compute_s_per_audio_s'], 3)} | {fmt(r['pct_of_matmul'], 1)} | "
                f"{fmt(r['pct_of_ort_gemm'], 1)} | {fmt(r['speedup_vs_torch_eager'], 2)}x |"
            )
        lines.append("")
    if sw := result.get("sweep"):
        title = (
            f"## Concurrency sweep (WebSocket): {sw['max_sustained_sessions']} sessions sustained"
        )
        lines += [title, "", _level_table(sw["rows"]), "", _stage_table(sw["rows"]), ""]
    if t := result.get("transports"):
        e = t["echo"]
        lines += [
            f"## Transports: {t['sessions']} live session(s)", "", _level_table(t["rows"]), "",
            _stage_table(t["rows"]), "",
            f"Floor: a bare `websockets` echo, same pacing and sessions: round trip of a 20 ms "
            f"frame p50 {fmt(e['p50_ms'], 2)} / p95 {fmt(e['p95_ms'], 2)} / p99 "
            f"{fmt(e['p99_ms'], 2)} ms ({e['frames']} frames). A transport's own share is the "
            f"event's latency minus its server-side stages (`transport` above).", "",
        ]  # fmt: skip
    if g := result.get("generation"):
        clip = g["clip"]
        lines += [
            f"## Generation: {clip['seconds']:g} s clips, {clip['steps']} steps, back to back",
            "", "| generator | clips | first audio s | total s | per step s | server first "
            "audio s | analysis p95 ms idle | while generating | skipped while generating |",
            "|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for name, r in g["generators"].items():
            idle, busy = r["phases"]["idle"], r["phases"]["generating"]
            lines.append(
                f"| {name} | {r['clips']} | {fmt(r['first_audio_s'], 2)} | {fmt(r['total_s'], 2)}"
                f" | {fmt(r['per_step_s'], 3)} | {fmt(r['server_first_audio_s'], 2)} | "
                f"{fmt(idle['p95_ms'])} | {fmt(busy['p95_ms'])} | {busy['skipped']} |"
            )
        lines.append("")
        lines += _alone_table(g)
    return "\n".join(lines)


def _alone_table(generation: dict[str, Any]) -> list[str]:
    """Clips on an otherwise idle server against diffusers' recipe in-process (same run)."""
    rows = [(name, r) for name, r in generation["generators"].items() if r.get("alone")]
    if not rows:
        return []
    lines = [
        "Alone: one session asks for clips back to back on an otherwise idle server, sending no "
        "audio (or streaming its own, analysed meanwhile); diffusers' AudioLDMPipeline recipe "
        "(DDIM, fp32, 2 threads, in-process) on the same clip in the same run:", "",
        "| generator | session | clips (UNet compiled) | first audio s | after the last "
        "denoising step s | total s | in the worker: UNet / VAE / vocoder s | diffusers recipe "
        "total s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in rows:
        reference = r.get("diffusers")
        for phase, what in (("alone", "no audio"), ("alone_streaming", "streaming")):
            if not (alone := r.get(phase)):
                continue
            speedup = _speedup(r, phase)
            lines.append(
                f"| {name} | {what} | {alone['clips']} ({alone.get('compiled_clips', 0)}) | "
                f"{fmt(alone['first_audio_s'], 2)} | "
                f"{fmt(alone['first_audio_after_denoising_s'], 2)} | {fmt(alone['total_s'], 2)} | "
                f"{fmt(alone.get('unet_s'), 2)} / {fmt(alone.get('vae_s'), 2)} / "
                f"{fmt(alone.get('vocoder_s'), 2)} | "
                f"{fmt(reference['total_s'], 2) if reference else '-'} | "
                f"{f'{speedup:.2f}x' if speedup else '-'} |"
            )
    return [*lines, ""]


def _level_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| transport | sessions | events | p50 ms | p95 ms | p99 ms | max ms | skipped | "
        "missing | loop lag mean ms | loop lag p99 <= ms | sustained |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lag = r["loop_lag"]
        lines.append(
            f"| {r['transport']} | {r['sessions']} | {r['events']} | {fmt(r['p50_ms'])} | "
            f"{fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['max_ms'])} | {r['skipped']} | "
            f"{r['missing']} | {fmt(lag.get('mean_ms'), 1)} | {fmt(lag.get('p99_le_ms'), 1)} | "
            f"{'yes' if r['sustained'] else 'no'} |"
        )
    return "\n".join(lines)


def _stage_table(rows: list[dict[str, Any]]) -> str:
    keys = ("transport_ms", *STAGES)
    lines = [
        "Mean per stage, ms (they add up to the mean latency):", "",
        "| transport | sessions | " + " | ".join(STAGE_LABELS[k] for k in keys) + " | batch |",
        "|---|---|" + "---|" * (len(keys) + 1),
    ]  # fmt: skip
    for r in rows:
        st = r.get("stages_mean_ms")
        if not st:
            continue
        cells = " | ".join(fmt(st[k], 1) for k in keys)
        lines.append(f"| {r['transport']} | {r['sessions']} | {cells} | {fmt(st['batch'], 1)} |")
    return "\n".join(lines)


def plots(result: dict[str, Any], folder: Path) -> list[Path]:
    """latency-cdf.png, p95-vs-sessions.png, stages.png (none without matplotlib)."""
    from benchmarks.analysis_kernels import pyplot  # imports torch: only when plotting

    if (plt := pyplot()) is None:
        return []
    written = []
    sweep = result.get("sweep", {}).get("rows", [])
    budget = result["settings"]["budget_ms"]
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in sweep:
            xs = r["latencies_ms"]
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))],
                    label=f"{r['sessions']} session(s)")  # fmt: skip
        ax.axvline(budget, color="grey", linestyle="--", label=f"budget {budget:g} ms")
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end analysis latency (ms, log)")
        ax.set_ylabel("fraction of events")
        ax.set_title("Latency CDF per concurrency level (WebSocket)")
        ax.legend(fontsize=8)
        written.append(_save(fig, folder / "latency-cdf.png"))

        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [r["sessions"] for r in sweep]
        for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
            ax.plot(xs, [r[key] for r in sweep], style, label=key.replace("_ms", ""))
        ax.axhline(budget, color="grey", linestyle="--", label=f"budget {budget:g} ms")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("live sessions")
        ax.set_ylabel("end-to-end latency (ms, log)")
        best = result["sweep"]["max_sustained_sessions"]
        ax.set_title(f"Latency vs live sessions: {best} sustained")
        ax.legend()
        written.append(_save(fig, folder / "p95-vs-sessions.png"))

    short = {"websocket": "WS", "webrtc": "RTC"}
    bars = [(f"{short[r['transport']]} {r['sessions']}", r) for r in sweep]
    bars += [(f"{short[r['transport']]} {r['sessions']}\n(transports)", r)
             for r in result.get("transports", {}).get("rows", [])]  # fmt: skip
    bars = [(label, r) for label, r in bars if r.get("stages_mean_ms")]
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, len(bars) * 0.9), 4.5))
        positions = list(range(len(bars)))
        bottom = [0.0] * len(bars)
        for key in ("transport_ms", *STAGES):
            heights = [r["stages_mean_ms"][key] for _, r in bars]
            ax.bar(positions, heights, bottom=bottom, label=STAGE_LABELS[key])
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(positions, [label for label, _ in bars], fontsize=8)
        ax.set_ylabel("mean ms per event")
        ax.set_xlabel("transport (WS = WebSocket, RTC = WebRTC) and live sessions")
        ax.set_title("Where an event's time goes")
        ax.legend(fontsize=7)
        written.append(_save(fig, folder / "stages.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """B's headline figures over A's: for latencies and times below 1 is better; for
    sessions and real-time factors see the name (rtf: lower is better)."""
    ha, hb = a.get("headline", {}), b.get("headline", {})
    lines = [
        f"A: {a.get('command', '?')} ({a.get('created', '?')})",
        f"B: {b.get('command', '?')} ({b.get('created', '?')})", "",
        "| figure | A | B | B / A |", "|---|---|---|---|",
    ]  # fmt: skip
    for key in sorted(set(ha) & set(hb)):
        x, y = ha[key], hb[key]
        if not isinstance(x, int | float) or not isinstance(y, int | float):
            continue
        ratio = f"{y / x:.2f}x" if x else "-"
        lines.append(f"| {key} | {fmt(float(x), 3)} | {fmt(float(y), 3)} | {ratio} |")
    only = sorted(set(ha) ^ set(hb))
    if only:
        lines += ["", "in one run only: " + ", ".join(only)]
    return "\n".join(lines)
