"""`grym-stream client` / `python -m clients.mic`: stream a microphone or a file, print events.

grym-stream client                          # default microphone, until Ctrl-C
grym-stream client --file speech.wav        # a file, paced in real time
grym-stream client --file speech.wav --fast # as fast as the server analyses it
grym-stream client --generate interval --every 8 --prompt "soft piano" --save-dir clips/
                                            # and generate from the context every 8 s
grym-stream client --generate continuous --save-dir clips/
                                            # one endless stream that follows the room
grym-stream client --file speech.wav --webrtc   # over WebRTC (Opus, data channel) instead
grym-stream client --encoding pcm_mulaw --rate 8000 speech.wav
                                            # as telephone audio: 8 kHz G.711 mu-law
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from clients.stream_client import ServerError, StreamClient, StreamResult, percentile
from stream.core.audio.pcm import Encoding

DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"


class NoMicrophone(RuntimeError):
    pass


async def file_blocks(
    path: str, frame_ms: float, stop: asyncio.Event, rate: int | None = None
) -> AsyncIterator[np.ndarray]:
    """The file in blocks of about `frame_ms`, resampled to `rate` (None: the file's own)."""
    info = sf.info(path)
    frames = max(1, round(info.samplerate * frame_ms / 1000))
    if rate is None or rate == info.samplerate:
        for block in sf.blocks(path, blocksize=frames, dtype="float32", always_2d=True):
            if stop.is_set():
                return
            yield _at_most_stereo(block)
        return
    # One streaming resampler for the whole file (no seams between blocks); what it returns
    # comes in its own sizes, so it is cut into frames of `frame_ms` again.
    channels = info.channels if info.channels <= 2 else 1
    resampler = soxr.ResampleStream(info.samplerate, rate, channels, dtype="float32")
    size = max(1, round(rate * frame_ms / 1000))
    pending = np.zeros((0, channels), np.float32)
    for block in sf.blocks(path, blocksize=frames, dtype="float32", always_2d=True):
        out = resampler.resample_chunk(_at_most_stereo(block)).reshape(-1, channels)
        pending = np.concatenate([pending, out])
        while len(pending) >= size:
            if stop.is_set():
                return
            yield pending[:size]
            pending = pending[size:]
    tail = resampler.resample_chunk(np.zeros((0, channels), np.float32), last=True)
    pending = np.concatenate([pending, tail.reshape(-1, channels)])
    for i in range(0, len(pending), size):
        if stop.is_set():
            return
        yield pending[i : i + size]


def _at_most_stereo(block: np.ndarray) -> np.ndarray:
    # The protocol carries 1 or 2 channels: fold anything wider to mono.
    return block if block.shape[1] <= 2 else block.mean(axis=1, keepdims=True)


class Microphone:
    """The sound card's input, opened up front so a missing device is reported before any
    connection is made. Blocks reach asyncio through a bounded queue."""

    def __init__(self, rate: int, channels: int, frame_ms: float, device: str | None) -> None:
        try:
            import sounddevice as sd
        except OSError as exc:  # PortAudio itself is missing
            raise NoMicrophone(f"PortAudio is not available ({exc})") from None
        self._queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=200)
        self._loop = asyncio.get_running_loop()
        self.dropped = 0
        try:
            self._stream = sd.InputStream(
                samplerate=rate,
                channels=channels,
                dtype="float32",
                blocksize=max(1, round(rate * frame_ms / 1000)),
                device=int(device) if device and device.isdigit() else device,
                callback=self._on_audio,
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise NoMicrophone(str(exc)) from None

    def _on_audio(self, data: np.ndarray, frames: int, when: Any, status: Any) -> None:
        # PortAudio's thread: hand the block to the loop, never touch the queue from here.
        self._loop.call_soon_threadsafe(self._put, data.copy())

    def _put(self, block: np.ndarray) -> None:
        if self._queue.full():  # the network is behind the sound card: say so, don't grow
            self._queue.get_nowait()
            self.dropped += 1
            print(f"warning: dropped {self.dropped} microphone block(s)", file=sys.stderr)
        self._queue.put_nowait(block)

    async def blocks(self, stop: asyncio.Event) -> AsyncIterator[np.ndarray]:
        with self._stream:
            while not stop.is_set():
                getter = asyncio.ensure_future(self._queue.get())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()


def describe_final(transcript: dict[str, Any] | None) -> str:
    """A line for an utterance the server finalised in this event ("" when none)."""
    final = (transcript or {}).get("final")
    if not final:
        return ""
    return f"final  [{final['start']:7.2f}-{final['end']:7.2f} s] {final['text']}\n"


def describe(event: dict[str, Any]) -> str:
    """A readable line per event, after a line for each utterance it finalised."""
    kind = event["type"]
    final = describe_final(event.get("transcript"))
    if kind == "analysis":
        f, vad = event.get("features", {}), event.get("vad", {})
        pitch = f"{f['pitch_hz']:6.1f} Hz" if f.get("pitch_hz") else "     -   "
        skipped = f"  skipped {event['skipped']}" if event.get("skipped") else ""
        partial = (event.get("transcript") or {}).get("partial")
        heard = f'  "{partial}"' if partial else ""  # the utterance so far
        return final + (
            f"[{event['start']:7.2f}-{event['end']:7.2f} s] "
            f"rms {f.get('rms_dbfs', float('nan')):6.1f} dBFS  "
            f"centroid {f.get('spectral_centroid_hz', 0):6.0f} Hz  pitch {pitch}  "
            f"speech {'yes' if vad.get('speech') else 'no '} ({vad.get('probability', 0):.2f})  "
            f"latency {event.get('latency_ms', 0):5.1f} ms server, "
            f"{event.get('client_latency_ms') or 0:5.1f} ms end-to-end{skipped}{heard}"
        )
    if kind == "error":
        return f"error {event['code']}: {event['message']}"
    if kind.startswith("generation."):
        return describe_generation(event)
    if kind == "end":
        return final + (
            f"end: {event['seconds']:.2f} s received ({event['samples_received']} samples), "
            f"{event['chunks']} chunks analysed, {event['skipped']} skipped"
        )
    return json.dumps(event)


def describe_generation(event: dict[str, Any]) -> str:
    kind, number = event["type"].removeprefix("generation."), event["id"]
    if kind in ("queued", "started"):
        trigger = event["trigger"]
        length = f"{event['seconds']:g} s"
        if event["mode"] == "continuous":
            length = f"continuous, {length} segments adding {event['hop_seconds']:g} s each"
        return (
            f"generation {number} {kind}: {trigger['reason']} at {trigger['at']:.2f} s, "
            f"seed {event['seed']}, {length}: {event['prompt']['text']!r}"
        )
    if kind == "progress":
        return f"generation {number}: step {event['step']}/{event['steps']}"
    if kind == "segment":
        return (
            f"generation {number} segment {event['segment']}: {event['samples']} samples from "
            f"{event['start']}, {event['realtime_factor']}x real time, "
            f"{event['ahead_s']:.2f} s ahead: {event['prompt']['text']!r}"
        )
    if kind in ("behind", "recovered"):
        return (
            f"generation {number} {'is behind' if kind == 'behind' else 'recovered'} "
            f"({event['realtime_factor']}x real time): "
            f"{event['change']} -> {event['steps']} steps, hop {event['hop_seconds']:g} s"
        )
    if kind == "done":
        seconds = event["samples"] / event["sample_rate"]
        made = f"{seconds:.2f} s of audio in {event['chunks']} chunks"
        if "segments" in event:  # a continuous stream
            return f"generation {number} done: {made}, {event['segments']} segments"
        t = event["timings"]
        return (
            f"generation {number} done: {made}, first audio after "
            f"{t['first_audio_after_submit_s']:.2f} s, total {t.get('total_s', 0):.2f} s"
        )
    if kind == "cancelled":
        return f"generation {number} cancelled ({event['reason']})"
    return f"generation {number} failed: {event.get('code')}: {event.get('message')}"


def save_generations(result: StreamResult, folder: Path) -> list[Path]:
    """Each generation's audio as a WAV file in `folder`, named by session and id."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for number, frames in sorted(result.audio.items()):
        path = folder / f"{result.ready['session']}-gen{number}.wav"
        sf.write(path, result.clip(number), frames[0][0].sample_rate, subtype="FLOAT")
        saved.append(path)
    return saved


def summary(result: StreamResult) -> str:
    server = [e["latency_ms"] for e in result.analysis if "latency_ms" in e]
    e2e = [
        e["client_latency_ms"] for e in result.analysis if e.get("client_latency_ms") is not None
    ]
    return (
        f"latency over {len(server)} events: server p50 {percentile(server, 50):.1f} ms, "
        f"p95 {percentile(server, 95):.1f} ms; end-to-end p50 {percentile(e2e, 50):.1f} ms, "
        f"p95 {percentile(e2e, 95):.1f} ms"
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="grym-stream client", description=__doc__.splitlines()[0])
    p.add_argument("--server", default=DEFAULT_URL, help=f"WebSocket URL (default {DEFAULT_URL})")
    p.add_argument("--file", help="stream this audio file instead of the microphone")
    p.add_argument("path", nargs="?", metavar="FILE", help="the same as --file FILE")
    p.add_argument(
        "--fast",
        action="store_true",
        help="send the file as fast as the server analyses it (no real-time pacing)",
    )
    p.add_argument("--device", help="input device name or index (see `python -m sounddevice`)")
    p.add_argument(
        "--rate",
        type=int,
        help="sample rate sent: the microphone's (default 48000), or a file's, which is "
        "resampled to it (default: the file's own rate)",
    )
    p.add_argument("--channels", type=int, default=1, choices=(1, 2), help="microphone channels")
    p.add_argument(
        "--encoding",
        choices=[e.value for e in Encoding],
        default="pcm_s16le",
        help="how the audio is sent (pcm_mulaw and pcm_alaw: G.711, as telephone networks do, "
        "normally with --rate 8000)",
    )
    p.add_argument("--frame-ms", type=float, default=20.0, help="audio per binary frame")
    p.add_argument("--chunk-seconds", type=float, help="analysis chunk length for this session")
    p.add_argument(
        "--decoder",
        choices=("auto", "greedy", "beam"),
        help="how the transcript is decoded (default: the server's; auto = beam search with the "
        "model's language model where it has one)",
    )
    p.add_argument("--token", help="access token, if the server needs one")
    p.add_argument(
        "--resume-seconds",
        type=float,
        default=60.0,
        help="if the connection breaks, keep resuming the session for this long (0: never)",
    )
    p.add_argument("--json", action="store_true", help="print raw JSON events")
    p.add_argument(
        "--webrtc",
        action="store_true",
        help="connect over WebRTC (POST /v1/webrtc/offer) instead of a WebSocket; needs --file",
    )
    g = p.add_argument_group("generation")
    g.add_argument(
        "--generate",
        action="append",
        choices=("interval", "novelty", "after_speech", "continuous"),
        help="trigger generations from the context (repeat to combine), or one endless stream "
        "that follows it (continuous)",
    )
    g.add_argument("--every", type=float, help="seconds between interval triggers")
    g.add_argument("--prompt", help="your words, leading the generated prompt")
    g.add_argument("--gen-seconds", type=float, help="length of each generated clip (segment)")
    g.add_argument("--hop-seconds", type=float, help="continuous: new audio per segment")
    g.add_argument("--steps", type=int, help="denoising steps")
    g.add_argument("--seed", type=int, help="fixed seed (default: a fresh one each time)")
    g.add_argument("--save-dir", type=Path, help="write each generation's audio here (WAV)")
    args = p.parse_args(list(argv))
    if args.path is not None:
        if args.file is not None and args.file != args.path:
            p.error("give the file once: as FILE or as --file FILE")
        args.file = args.path
    return args


def session_config(args: argparse.Namespace) -> dict[str, Any]:
    """The `start.config` the flags ask for."""
    config: dict[str, Any] = {}
    if args.chunk_seconds:
        config["chunk_seconds"] = args.chunk_seconds
    if args.decoder:
        config["ctc_decoder"] = args.decoder
    if generation := generation_config(args):
        config["generation"] = generation
    return config


def generation_config(args: argparse.Namespace) -> dict[str, Any] | None:
    chosen = {
        "interval_seconds": args.every, "prompt": args.prompt, "seconds": args.gen_seconds,
        "steps": args.steps, "seed": args.seed, "hop_seconds": args.hop_seconds,
    }  # fmt: skip
    if args.generate:
        chosen["triggers"] = [kind for kind in args.generate if kind != "continuous"]
        if "continuous" in args.generate:
            chosen["mode"] = "continuous"
    config = {k: v for k, v in chosen.items() if v is not None}
    return config or None


def offer_url(server: str) -> str:
    """ws://host:port/v1/stream -> http://host:port/v1/webrtc/offer"""
    scheme, _, rest = server.partition("://")
    host = rest.split("/", 1)[0]
    return f"{'https' if scheme == 'wss' else 'http'}://{host}/v1/webrtc/offer"


async def _streamed(args: argparse.Namespace, running: Any) -> StreamResult | None:
    """Await a client's run; refusals and unreachable servers are one line on stderr (None);
    the latency summary follows a run unless the output is JSON."""
    try:
        result = await running
    except ServerError as exc:
        print(f"grym-stream client: the server refused the stream: {exc}", file=sys.stderr)
        return None
    except OSError as exc:
        print(f"grym-stream client: cannot reach {args.server}: {exc}", file=sys.stderr)
        return None
    if not args.json:
        print(summary(result), flush=True)
    return result


async def run_webrtc(args: argparse.Namespace, config: dict[str, Any]) -> int:
    from clients.webrtc_client import WebRtcClient

    audio, rate = sf.read(args.file, dtype="float32", always_2d=True)

    def show(event: dict[str, Any]) -> None:
        print(json.dumps(event) if args.json else describe(event), flush=True)

    client = WebRtcClient(offer_url(args.server), config, args.token, on_event=show)
    result = await _streamed(args, client.run(_at_most_stereo(audio), rate))
    if result is None:
        return 1
    if args.save_dir and len(result.played_audio):
        args.save_dir.mkdir(parents=True, exist_ok=True)
        path = args.save_dir / f"{result.ready['session']}-played.wav"
        sf.write(path, result.played_audio, 48_000, subtype="FLOAT")
        print(f"saved {path} (the server's track, as played)", flush=True)
    fatal = any(e.get("fatal") for e in result.errors)
    return 1 if fatal or result.end is None else 0


async def run(args: argparse.Namespace) -> int:
    if args.webrtc:
        if not args.file:
            print("grym-stream client: --webrtc streams a --file", file=sys.stderr)
            return 2
        config = session_config(args)
        return await run_webrtc(args, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)  # Ctrl-C: send `stop`, wait for `end`
    if args.file:
        info = sf.info(args.file)
        rate, channels = args.rate or info.samplerate, info.channels if info.channels <= 2 else 1
        blocks = file_blocks(args.file, args.frame_ms, stop, rate)
    else:
        rate, channels = args.rate or 48000, args.channels
        try:
            blocks = Microphone(rate, channels, args.frame_ms, args.device).blocks(stop)
        except NoMicrophone as exc:
            print(
                f"grym-stream client: no microphone could be opened ({exc}).\n"
                "Stream a file instead: grym-stream client --file speech.wav",
                file=sys.stderr,
            )
            return 2
    config = session_config(args)
    if args.fast:
        config["when_behind"] = "wait"

    def show(event: dict[str, Any]) -> None:
        print(json.dumps(event) if args.json else describe(event), flush=True)

    client = StreamClient(
        args.server, rate, channels, Encoding(args.encoding), config, args.token, on_event=show,
        resume_seconds=args.resume_seconds,
    )  # fmt: skip
    result = await _streamed(args, client.run(blocks, realtime=not args.fast))
    if result is None:
        return 1
    if args.save_dir:
        for path in save_generations(result, args.save_dir):
            print(f"saved {path}", flush=True)
    fatal = any(e.get("fatal") for e in result.errors)
    return 1 if fatal or result.end is None else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
