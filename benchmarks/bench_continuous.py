"""`grym-stream bench`'s continuous section: continuous generation through a real server.

Per generator, one server (the bench's analysis settings plus `--generator`), three phases, in
each one session that streams audio in real time for `--continuous-seconds`:
- alone: it runs a continuous stream (below) with no other session on the server;
- idle: beside `--generation-sessions` live sessions, it generates nothing (their analysis
  latency without generation);
- continuous: it runs a continuous stream for as long as it lasts (`mode: "continuous"`, 4 s
  segments adding 2 s, `--steps` steps to begin with; the stream lowers them, then lengthens
  its hop, by itself when it falls behind).
Measured: per segment the real-time factor (the audio it adds over the time it took; above 1
keeps up), how far the stream was ahead of the client's playback, the `behind` and `recovered`
events and the steps and hop the stream settled on; how audible the joins are
(models/audioldm.py seam_ratio, on the audio as the client received it, and in-process against
the same segments made without continuing); and the live sessions' analysis latency in both
phases.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import RATE, progress, run_level, session_config, speech_like
from benchmarks.report import fmt
from benchmarks.server import analysis_flags, serving
from clients.stream_client import StreamClient, StreamResult, percentile
from stream.core.audio.pcm import Encoding

# The stream: 4 s segments adding 2 s each (the `soundtrack` preset's), `--steps` steps to
# begin with. Where a generator cannot keep up at those (the AudioLDM-S architecture on two
# cores), the bench reports where the stream's own adaptation settles.
SEGMENT_S, HOP_S = 4.0, 2.0


async def _streaming(url: str, seconds: float, config: dict[str, Any]) -> dict[str, Any]:
    """One live session with a continuous stream; its segments, `behind` events and seams."""
    client = StreamClient(url, RATE, 1, Encoding.PCM_S16LE, dict(config), resume_seconds=0)

    async def frames() -> Any:
        audio = speech_like(seconds, seed=99)
        for i in range(0, len(audio), 320):
            yield audio[i : i + 320, None]

    result: StreamResult = await client.run(frames(), realtime=True)
    events = result.generation(1)
    segments = [e for e in events if e["type"] == "generation.segment"]
    paced = {kind: [e for e in events if e["type"] == f"generation.{kind}"]
             for kind in ("behind", "recovered")}  # fmt: skip
    end = events[-1] if events else {}
    audio = result.clip(1)
    fade = round(config.get("generation", {}).get("crossfade_seconds", 0.1) * RATE)
    from models.audioldm import seam_ratio  # (imports torch: only in this section)

    joins = [s["start"] + fade // 2 for s in segments[1:]]
    factors = [s["realtime_factor"] for s in segments[1:]]  # the first also waits for the text
    settled = segments[-1] if segments else {}
    return {
        "segments": len(segments),
        "outcome": end.get("type", "none").removeprefix("generation."),
        "audio_s": len(audio) / RATE,
        "realtime_factor_median": percentile(factors, 50) if factors else float("nan"),
        "realtime_factor_min": min(factors) if factors else float("nan"),
        "realtime_factor_last4": float(np.mean(factors[-4:])) if factors else float("nan"),
        "ahead_s_min": min((s["ahead_s"] for s in segments[1:]), default=float("nan")),
        "late_segments": sum(s["late"] for s in segments),
        # the stream's changes of pace: fell behind, went back
        **{
            kind: [{k: e[k] for k in ("segment", "change", "steps", "hop_seconds")} for e in got]
            for kind, got in paced.items()
        },  # fmt: skip
        "settled": {"steps": settled.get("steps"), "hop_seconds": settled.get("hop_seconds")},
        "seam_ratio": seam_ratio(audio, joins) if joins else float("nan"),
        # Per segment: where it starts in the stream (s), real-time factor, seconds ahead of
        # the client's playback at its end, steps, hop: for the plot.
        "per_segment": [
            [
                round(s["start"] / RATE, 3),
                s["realtime_factor"],
                s["ahead_s"],
                s["steps"],
                s["hop_seconds"],
            ]
            for s in segments
        ],  # fmt: skip
        "segment_total_s_median": percentile([s["timings"]["total_s"] for s in segments], 50)
        if segments
        else float("nan"),  # fmt: skip
    }


async def _phase(url: str, args: argparse.Namespace, stream: dict[str, Any] | None) -> dict:
    config = session_config(args)
    live = run_level(url, args.generation_sessions, args.continuous_seconds, "websocket", config)
    if stream is None:  # the same fifth session, generating nothing
        row, _ = await asyncio.gather(live, _streaming(url, args.continuous_seconds + 2, config))
        return row
    config = {**config, "generation": stream}
    row, made = await asyncio.gather(live, _streaming(url, args.continuous_seconds + 2, config))
    return {**row, "stream": made}


def run_continuous(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": args.continuous_seconds, "generators": {}}
    for generator in args.generators:
        stream = {"mode": "continuous", "seconds": SEGMENT_S, "hop_seconds": HOP_S,
                  "steps": args.steps, "seed": 0}  # fmt: skip
        with serving(args, *analysis_flags(args), "--generator", generator) as url:
            phases = {}
            progress(f"generator {generator}, alone: one session with a stream for "
                     f"{args.continuous_seconds:g} s ...")  # fmt: skip
            alone = {**session_config(args), "generation": stream}
            made = asyncio.run(_streaming(url, args.continuous_seconds + 2, alone))
            phases["alone"] = {"stream": made}
            progress(f"  {_note(phases['alone']['stream'])}")
            for name, chosen in (("idle", None), ("continuous", stream)):
                progress(f"generator {generator}, {name}: {args.generation_sessions} live "
                         f"session(s) + 1 x {args.continuous_seconds:g} s ...")  # fmt: skip
                phases[name] = asyncio.run(_phase(url, args, chosen))
                made = phases[name].get("stream")
                note = f", {_note(made)}" if made else ""
                progress(f"  analysis p95 {phases[name]['p95_ms']:.0f} ms{note}")
        progress(f"generator {generator}: the same segments in-process, continued and not ...")
        seams = seams_in_process(generator, args.steps)
        progress(f"  seams x{seams['continued']:.2f} continued, x{seams['independent']:.2f} not")
        out["generators"][generator] = {"stream": stream, "phases": phases, "seams": seams}
    return out


def seams_in_process(generator: str, steps: int, count: int = 5) -> dict[str, float]:
    """The same segments (prompt, seeds, steps) made in this process one after another, each
    continuing the one before, and each on its own (no inpainting, no crossfade): the seam
    ratio of each, for what the continuation buys."""
    from models.audioldm import AudioLDM, seam_ratio
    from models.audioldm_components import load_generator
    from models.generation import GenerationRequest

    pipeline = AudioLDM(load_generator(generator))
    out = {}
    for name, continued in (("continued", True), ("independent", False)):
        audio: list[np.ndarray] = []
        joins: list[int] = []
        continuation = None
        for k in range(count):
            request = GenerationRequest(
                "calm ambient pad", seconds=SEGMENT_S, seed=k, steps=steps, hop_seconds=HOP_S,
                continuation=continuation,
            )  # fmt: skip
            blocks = list(pipeline.generate(request))
            if audio:  # the middle of the crossfade, where one gives way to the next
                fade = len(continuation.tail) if continuation is not None else 0
                joins.append(sum(len(a) for a in audio) + fade // 2)
            audio.append(np.concatenate([b.audio for b in blocks]))
            continuation = blocks[-1].continuation if continued else None
        out[name] = seam_ratio(np.concatenate(audio), joins)
    return out


def _note(made: dict[str, Any]) -> str:
    return (f"{made['segments']} segments, real time x{made['realtime_factor_median']:.2f} "
            f"(last 4: x{made['realtime_factor_last4']:.2f}), {made['late_segments']} late, "
            f"settled at {made['settled']['steps']} steps / hop {made['settled']['hop_seconds']} "
            f"s, seams x{made['seam_ratio']:.2f}")  # fmt: skip


def plots(result: dict[str, Any], folder: Path) -> list[Path]:
    """continuous.png: per generator and phase, each segment's real-time factor and how far the
    stream was ahead of playback, along the stream (none without matplotlib)."""
    from benchmarks.analysis_kernels import pyplot  # imports torch: only when plotting

    c = result.get("continuous")
    if not c or (plt := pyplot()) is None:
        return []
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, g in c["generators"].items():
        for phase, style in (("alone", "-"), ("continuous", "--")):
            rows = g["phases"][phase]["stream"]["per_segment"]
            label = f"{name}, {'alone' if phase == 'alone' else 'beside live sessions'}"
            top.plot([r[0] for r in rows], [r[1] for r in rows], style, marker=".", label=label)
            bottom.plot([r[0] for r in rows], [r[2] for r in rows], style, marker=".", label=label)
    top.axhline(1.0, color="grey", linestyle=":", label="real time")
    top.set_ylabel("real-time factor\n(audio added / time taken)")
    top.set_yscale("log")
    top.set_title("Continuous generation: does each segment keep up?")
    top.legend(fontsize=7)
    bottom.axhline(0.0, color="grey", linestyle=":")
    bottom.set_ylabel("s ahead of playback")
    bottom.set_xlabel("segment start in the stream (s)")
    fig.tight_layout()
    path = folder / "continuous.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def headline(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, g in result.get("continuous", {}).get("generators", {}).items():
        for phase in ("alone", "continuous"):
            made, where = g["phases"][phase]["stream"], "alone" if phase == "alone" else "beside"
            out[f"continuous_realtime_factor_{where}_{name}"] = made["realtime_factor_median"]
            out[f"continuous_late_segments_{where}_{name}"] = made["late_segments"]
        out[f"continuous_seam_ratio_{name}"] = g["phases"]["alone"]["stream"]["seam_ratio"]
        out[f"seam_ratio_independent_segments_{name}"] = g["seams"]["independent"]
        out[f"analysis_p95_ms_beside_continuous_{name}"] = g["phases"]["continuous"]["p95_ms"]
        out[f"analysis_p95_ms_beside_nothing_{name}"] = g["phases"]["idle"]["p95_ms"]
    return out


def markdown(result: dict[str, Any]) -> str:
    c = result.get("continuous")
    if not c:
        return ""
    live = result["settings"].get("generation_sessions")
    lines = [
        "",
        f"## Continuous generation: one stream for {c['seconds']:g} s, alone and beside {live} "
        "live session(s)", "",
        "| generator | where | segment / hop s, steps at start | segments | real-time factor "
        "median (min, last 4) | late segments | settled at: steps, hop s | seams (1 = like any "
        "moment) | analysis p95 ms of the live sessions: beside nothing / beside the stream |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, g in c["generators"].items():
        s = g["stream"]
        for phase in ("alone", "continuous"):
            made = g["phases"][phase]["stream"]
            p95 = "-"
            if phase == "continuous":
                p95 = f"{fmt(g['phases']['idle']['p95_ms'])} / {fmt(g['phases'][phase]['p95_ms'])}"
            lines.append(
                f"| {name} | {'alone' if phase == 'alone' else f'beside {live}'} | "
                f"{s['seconds']:g} / {s['hop_seconds']:g}, {s['steps']} | {made['segments']} | "
                f"{fmt(made['realtime_factor_median'], 2)} "
                f"({fmt(made['realtime_factor_min'], 2)}, "
                f"{fmt(made['realtime_factor_last4'], 2)}) | {made['late_segments']} | "
                f"{made['settled']['steps']}, {made['settled']['hop_seconds']} | "
                f"{fmt(made['seam_ratio'], 2)} | {p95} |"
            )
    lines += [
        "", "Seams in-process, the same segments (prompt, seeds, steps) continued one from the "
        "other, and each made on its own (no inpainting, no crossfade):", "",
        "| generator | seams, continued | seams, independent |", "|---|---|---|",
    ]  # fmt: skip
    for name, g in c["generators"].items():
        seams = g["seams"]
        lines.append(f"| {name} | {fmt(seams['continued'], 2)} | {fmt(seams['independent'], 2)} |")
    return "\n".join([*lines, ""]) + "\n"
