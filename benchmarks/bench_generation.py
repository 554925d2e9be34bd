"""`grym-stream bench`'s generation section: clips made through a real server, and what they are
held against.

Per generator, one server (the bench's analysis settings plus `--generator`), four phases:
- alone: one session asks for a clip as soon as the last is done, on an otherwise idle server;
  it sends no audio (a text-to-audio client): the idle machine the clip figures are quoted for;
- alone, streaming: the same session also streams audio, which the server analyses meanwhile;
- idle: `--generation-sessions` live sessions beside a fifth that streams the same audio and
  asks for nothing (analysis latency without generation);
- generating: the same, the fifth asking for clips back to back (does generation starve
  analysis?).
Per clip: the time to its first audio and to `generation.done` as the client saw it, and the
worker's own stage timings. Beside them, diffusers' AudioLDMPipeline recipe on the same clip in
a process of its own (benchmarks/generation.py), for the speed-up the issue tracker asks about.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import deque
from typing import Any

from benchmarks.load import RATE, progress, run_level, session_config, speech_like, sustained
from benchmarks.server import analysis_flags, serving
from clients.stream_client import StreamClient, StreamResult, percentile
from stream.core.audio.pcm import Encoding


async def _generating(
    url: str,
    seconds: float,
    clip: dict[str, Any] | None,
    config: dict[str, Any],
    streaming: bool = True,
) -> dict[str, Any]:
    """A live session that asks for a new clip when the last one is done (`clip` None: asks
    for none, so that the idle phase has the same sessions); per clip the time from the
    request to its first audio frame and to `generation.done`, as the client saw it.
    `streaming` False: the session sends no audio (nothing to analyse), only its requests."""
    client = StreamClient(url, RATE, 1, Encoding.PCM_S16LE, dict(config), resume_seconds=0)
    request = {"type": "generate", "auto_prompt": False, "prompt": "ambient pad", **(clip or {})}
    waiting: deque[float] = deque()  # when each request not yet answered was sent
    asked: dict[int, float] = {}  # generation id -> when its request was sent
    tasks: set[asyncio.Task[None]] = set()

    def ask() -> None:
        if clip is None:
            return
        waiting.append(time.monotonic())
        task = asyncio.ensure_future(client.send_control(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_event(event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind.startswith("generation.") and event["id"] not in asked and waiting:
            asked[event["id"]] = waiting.popleft()  # the server answers requests in order
        if kind == "analysis" and event["seq"] == 0:
            ask()
        elif kind in ("generation.done", "generation.failed") and not input_done:
            ask()

    input_done = False
    client.on_event = on_event

    async def frames() -> Any:
        nonlocal input_done
        audio = speech_like(seconds, seed=99)
        if streaming:
            for i in range(0, len(audio), 320):
                yield audio[i : i + 320, None]
        else:  # a 20 ms frame opens the stream; then only the requests
            yield audio[:320, None] * 0
            while not client.connected:
                await asyncio.sleep(0.01)
            ask()
            await asyncio.sleep(seconds)
        input_done = True  # no new clip once the audio ends: `stop` waits for the last one

    result: StreamResult = await client.run(frames(), realtime=True)
    clips = []
    for number, asked_at in sorted(asked.items()):
        done = [e for e in result.generation(number) if e["type"] == "generation.done"]
        if not done or number not in result.first_audio_at:
            continue
        timings = done[0]["timings"]
        clips.append({
            "first_audio_s": result.first_audio_at[number] - asked_at,
            "total_s": done[0]["client_time"] - asked_at,
            "server_first_audio_s": timings.get("first_audio_after_submit_s"),
            "server_total_s": timings.get("total_s"),
            "first_audio_after_denoising_s": timings.get("first_audio_after_denoising_s"),
            "paused_for_analysis_s": timings.get("paused_for_analysis_s", 0.0),
            "unet_compiled": timings.get("unet") == "compiled",
            # The worker's own stages: where a clip's time went inside the generator.
            "unet_s": sum(timings.get("unet_steps", [])),
            "vae_s": timings.get("vae_s"),
            "vocoder_s": timings.get("vocoder_s"),
        })  # fmt: skip
    failed = sum(e["type"] == "generation.failed" for e in result.events)
    return {"clips": clips, "failed": failed}


async def _generation_phase(url: str, args: argparse.Namespace, clip: dict | None) -> dict:
    config = session_config(args)
    live = run_level(url, args.generation_sessions, args.seconds, "websocket", config)
    # The generating session outlasts the live ones so that they run under load throughout. It
    # streams in the idle phase too, asking for nothing: the phases differ by generation only.
    row, gen = await asyncio.gather(live, _generating(url, args.seconds + 2.0, clip, config))
    return {**row, **gen} if clip is not None else row


def run_generation(args: argparse.Namespace) -> dict[str, Any]:
    clip = {"seconds": args.clip_seconds, "steps": args.steps}
    out: dict[str, Any] = {"clip": clip, "generators": {}}
    for generator in args.generators:
        threads = ["--generation-threads", str(args.generation_threads)]
        flags = [*analysis_flags(args), "--generator", generator,
                 *(threads if args.generation_threads else [])]  # fmt: skip
        _compile_first(args, generator)
        with serving(args, *flags) as url:
            phases = {}
            for name, streaming in (("alone", False), ("alone_streaming", True)):
                what = "streaming its audio" if streaming else "sending no audio"
                progress(f"generator {generator}, {name}: clips on an idle server, the session "
                         f"{what}, for {args.seconds:g} s ...")  # fmt: skip
                alone = _generating(url, args.seconds, clip, session_config(args), streaming)
                phases[name] = asyncio.run(alone)
                progress(f"  {_clip_note(phases[name]['clips'])}")
            for name, chosen in (("idle", None), ("generating", clip)):
                progress(f"generator {generator}, {name}: {args.generation_sessions} live "
                         f"session(s) x {args.seconds:g} s ...")  # fmt: skip
                row = asyncio.run(_generation_phase(url, args, chosen))
                row["sustained"] = sustained(row, args.budget_ms)
                phases[name] = row
                note = f", {_clip_note(row['clips'])}" if row.get("clips") else ""
                progress(f"  p95 {row['p95_ms']:.0f} ms, skipped {row['skipped']}{note}")
        clips = phases["generating"].get("clips", [])
        summary = _clip_summary(clips)
        summary["per_step_s"] = summary["total_s"] / args.steps if clips else float("nan")
        summary["alone"] = _clip_summary(phases["alone"]["clips"])
        summary["alone_streaming"] = _clip_summary(phases["alone_streaming"]["clips"])
        summary["diffusers"] = diffusers_reference(args, generator)
        out["generators"][generator] = {"phases": phases, "clips": len(clips), **summary}
    return out


def _compile_first(args: argparse.Namespace, generator: str) -> None:
    """Compile the UNet for the bench's clip ahead of the server, as a deployment would
    (`python -m models.audioldm_compiled`; nothing to do once the cache has it), so that clips
    are not timed while the server compiles in the background. Generators the server leaves
    eager (`generation_compile` auto: tiny) are left alone."""
    if args.url or generator == "tiny" or "--generation-compile off" in args.serve_args:
        return
    progress(f"generator {generator}: the compiled UNet for {args.clip_seconds:g} s clips "
             "(made once per machine) ...")  # fmt: skip
    command = [sys.executable, "-m", "models.audioldm_compiled", "--generator", generator,
               "--seconds", f"{args.clip_seconds:g}"]  # fmt: skip
    subprocess.run(command, check=True)


CLIP_FIGURES = ("first_audio_s", "total_s", "server_first_audio_s", "server_total_s",
                "first_audio_after_denoising_s", "unet_s", "vae_s", "vocoder_s")  # fmt: skip


def _clip_summary(clips: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the clips of each figure, and how many clips."""
    out: dict[str, Any] = {"clips": len(clips)}
    out["compiled_clips"] = sum(c.get("unet_compiled", False) for c in clips)
    for name in CLIP_FIGURES:
        values = [c[name] for c in clips if c.get(name) is not None]
        out[name] = percentile(values, 50) if values else float("nan")
    return out


def _clip_note(clips: list[dict[str, Any]]) -> str:
    s = _clip_summary(clips)
    return (f"{s['clips']} clip(s): first audio {s['first_audio_s']:.2f} s "
            f"({s['first_audio_after_denoising_s']:.2f} s after the last step), total "
            f"{s['total_s']:.2f} s")  # fmt: skip


def diffusers_reference(args: argparse.Namespace, generator: str) -> dict[str, Any] | None:
    """diffusers' AudioLDMPipeline recipe (DDIM, fp32, 2 threads, in-process) on the same clip,
    in a process of its own (benchmarks/generation.py): what the server's clips are held
    against. None for generators it cannot build (trained ones from a folder or the hub)."""
    if generator not in ("tiny", "s-random") or args.url:
        return None
    path = args.out / f"generation-diffusers-{generator}.json"
    progress(f"generator {generator}: diffusers' recipe in-process, for reference ...")
    command = [sys.executable, "-m", "benchmarks.generation", "--preset", generator,
               "--seconds", f"{args.clip_seconds:g}", "--steps", str(args.steps),
               "--only", "diffusers", "--repeats", "1" if args.quick else "2",
               "--out", str(path)]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    (row,) = json.loads(path.read_text())["rows"]
    progress(f"  total {row['total_s']:.2f} s")
    return {"json": path.name, "threads": 2, **{k: row[k] for k in ("total_s", "first_audio_s",
            "unet_step_s", "vae_s", "vocoder_s")}}  # fmt: skip
