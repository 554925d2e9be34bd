"""Transcript accuracy: whole utterance vs streamed through a real server, on held-out speech.

An evaluation set (`--set`, models/training/evaluate.py): `unseen`, sentences of a text source
no part of the model was trained or tuned on, spoken by voices training never heard (the
headline); or `grammar`, the training grammar's held-out sentences in held-out voices. They are
decoded twice with the same ONNX artifact: in one pass over the whole utterance, and streamed over
WebSocket through a real server process at its default chunk, context and feature-cache settings,
sent as 44.1 kHz stereo 16-bit PCM so that down-mixing and resampling are in the path. Both are
decoded the same way, by the server's own code: `--decoder` is the server's --ctc-decoder
(auto: beam search with the model's character LM where it has one; greedy; beam). CER =
character edits / reference characters over all sentences (WER likewise in words).

    python -m benchmarks.transcript_accuracy               # tiny (the shipped model), int8
    python -m benchmarks.transcript_accuracy --set grammar
    python -m benchmarks.transcript_accuracy --decoder greedy
    python -m benchmarks.transcript_accuracy --limit 20 --variant fp32
    python -m benchmarks.transcript_accuracy --wire 8k-mulaw  # telephone audio: G.711 at 8 kHz
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from benchmarks.server import server_process
from clients.stream_client import StreamClient
from models.base import ANALYSIS_SAMPLE_RATE
from models.char_lm import find_language_model
from models.training.evaluate import EVAL_SETS, Utterance, cer, eval_clips, summarize, wer
from models.wav2vec2_runtime import log_softmax
from stream.core.audio.pcm import Encoding
from stream.core.text.transcript import CtcVocabulary
from stream.session.analysis import beam_decoder
from stream.settings import Settings

RATE = ANALYSIS_SAMPLE_RATE  # of the evaluation clips
BEAM_WIDTH = Settings.model_fields["ctc_beam_width"].default  # the server's
# How the audio travels: (sample rate, channels, encoding). The default puts down-mixing and
# resampling in the path; the telephony ones, G.711 at 8 kHz (--wire 8k-mulaw).
WIRES = {
    "44k-stereo": (44100, 2, Encoding.PCM_S16LE),
    "16k": (16000, 1, Encoding.PCM_S16LE),
    "8k-mulaw": (8000, 1, Encoding.PCM_MULAW),
    "8k-alaw": (8000, 1, Encoding.PCM_ALAW),
}


def whole_utterance(analyser: Any, audio: np.ndarray, decoder: str) -> str:
    """One pass over the whole clip, decoded as the server decodes a stream with `decoder`."""
    logits = analyser.run_batch(audio[None])["logits"][0]
    vocabulary = CtcVocabulary.from_tokens(*analyser.ctc_vocabulary)
    beam = beam_decoder(vocabulary, decoder, BEAM_WIDTH, analyser.language_model)
    if beam is None:
        return vocabulary.decode(logits.argmax(-1))
    beam.advance(log_softmax(logits))
    return beam.finish()


async def _frames(audio: np.ndarray, rate: int) -> AsyncIterator[np.ndarray]:
    frame = rate // 50  # 20 ms
    for i in range(0, len(audio), frame):
        yield audio[i : i + frame]


async def streamed(
    url: str, clips: list[np.ndarray], concurrency: int, config: dict[str, Any], wire: str
) -> list[str]:
    """Each clip as its own session, `concurrency` at a time, sent as fast as the server takes
    it (when_behind=wait: back-pressure instead of skipping chunks)."""
    limit = asyncio.Semaphore(concurrency)

    async def one(audio: np.ndarray) -> str:
        rate, channels, encoding = WIRES[wire]
        sent = soxr.resample(audio, RATE, rate).astype(np.float32)
        frames = np.repeat(sent[:, None], channels, axis=1)
        client = StreamClient(url, rate, channels, encoding, {**config, "when_behind": "wait"})
        async with limit:
            result = await client.run(_frames(frames, rate), realtime=False)
        if result.errors:
            raise RuntimeError(f"server reported errors: {result.errors}")
        return " ".join(result.transcript.split())

    return await asyncio.gather(*(one(audio) for audio in clips))


def rates(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """Corpus CER and WER, as the training recipe's evaluation computes them."""
    return summarize([Utterance(r, h, cer(r, h), wer(r, h)) for r, h in zip(refs, hyps)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--variant", default="int8", choices=["fp32", "fp32-opt", "int8"])
    parser.add_argument("--decoder", default="auto", choices=["auto", "greedy", "beam"])
    parser.add_argument("--limit", type=int, help="first N sentences (default all)")
    parser.add_argument(
        "--set", default="unseen", choices=EVAL_SETS,
        help="unseen: an evaluation-only text source in held-out voices (the headline); "
        "grammar: the training grammar's held-out sentences in held-out voices",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=4, help="sessions at a time")
    parser.add_argument(
        "--config", default="{}", help="session config JSON, e.g. '{\"lookahead_seconds\": 0.5}'"
    )
    parser.add_argument("--wire", default="44k-stereo", choices=list(WIRES), help="audio format")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from models.export import ensure_artifact
    from models.wav2vec2_runtime import Wav2Vec2Analyser

    print(f"synthesising the {args.set} set (cached after the first run)...", file=sys.stderr)
    clips = eval_clips(args.set, args.limit)
    refs = [text for text, _ in clips]
    artifact = ensure_artifact(args.model, args.variant)
    lm = find_language_model(Path(artifact.spec.path)) if artifact.spec.path else None
    analyser = Wav2Vec2Analyser(artifact.folder, threads=2, language_model=lm)
    print(f"decoding {len(clips)} whole utterances...", file=sys.stderr)
    whole = [whole_utterance(analyser, audio, args.decoder) for _, audio in clips]
    print(f"streaming {len(clips)} clips through a server...", file=sys.stderr)
    started = time.perf_counter()
    with server_process(
        "--analysis-model", args.model, "--analysis-variant", args.variant, "--generator", "none",
        "--ctc-decoder", args.decoder,
    ) as url:  # fmt: skip
        config = json.loads(args.config)
        clip_audio = [a for _, a in clips]
        live = asyncio.run(streamed(url, clip_audio, args.concurrency, config, args.wire))
    stream_seconds = time.perf_counter() - started

    scores = {"whole": rates(refs, whole), "streamed": rates(refs, live)}
    gap = 100 * (scores["streamed"]["cer"] - scores["whole"]["cer"])
    print(
        f"\n{args.model} ({args.variant}, {args.decoder} decoding, streamed as {args.wire}), "
        f"{len(clips)} sentences of the {args.set} set"
        f", {sum(len(a) for _, a in clips) / RATE:.0f} s of speech\n"
    )
    print("| decoding | CER % | WER % |\n|---|---|---|")
    for mode, score in scores.items():
        print(f"| {mode} | {100 * score['cer']:.2f} | {100 * score['wer']:.2f} |")
    print(f"\nstreamed - whole: {gap:+.2f} CER points")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "".join(f"-{k}-{v}" for k, v in sorted(json.loads(args.config).items()))
    suffix += "" if args.wire == "44k-stereo" else f"-{args.wire}"
    decoding = "" if args.decoder == "greedy" else f"-{args.decoder}"
    name = f"transcript_accuracy-{args.set}-{args.model}-{args.variant}{decoding}{suffix}.json"
    path = out / name
    report = {
        "model": args.model, "variant": args.variant, "trained": analyser.trained,
        "decoder": args.decoder, "set": args.set,
        "language_model": lm.describe() if lm and args.decoder != "greedy" else None,
        "sentences": len(clips),
        "wire_format": dict(zip(("sample_rate", "channels", "encoding"), WIRES[args.wire])),
        "session_config": json.loads(args.config), "scores": scores,
        "streamed_minus_whole_cer_points": gap,
        "stream_seconds": round(stream_seconds, 1),
        "utterances": [
            {"reference": r, "whole": w, "streamed": s} for r, w, s in zip(refs, whole, live)
        ],
    }  # fmt: skip
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
