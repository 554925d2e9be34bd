"""Streaming fidelity: wav2vec2 run chunk by chunk (as the server does) vs the whole utterance.

For each left-context length, the audio is cut by the server's own chunker, each window runs
through the same ONNX Runtime session, only the chunk's frames are kept (models/frames.py), and
the stitched frames are compared with one pass over the whole audio: CTC argmax agreement and
the cosine of last hidden states, frame by frame. Random-weight models mix information across
the whole window, so their figures are a plumbing check, not an accuracy figure.

    python -m benchmarks.fidelity --model tiny --variant fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.base import ANALYSIS_SAMPLE_RATE
from models.frames import STRIDE, chunk_frames
from models.wav2vec2_runtime import Wav2Vec2Analyser
from stream.core.audio.chunker import Chunker

RATE = ANALYSIS_SAMPLE_RATE


def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like test signal: harmonic tones with a wandering pitch, bursts and pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t) + 20 * rng.standard_normal() * np.sin(t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = (np.sin(2 * np.pi * 1.9 * t) > -0.3).astype(float)
    signal = 0.2 * voiced * envelope + 0.02 * rng.standard_normal(len(t))
    return signal.astype(np.float32)


def streamed_outputs(
    analyser: Wav2Vec2Analyser, audio: np.ndarray, chunk: int, left: int, stream: str = ""
) -> tuple[dict[str, np.ndarray], float]:
    """Frames of every chunk, stitched; and the compute seconds per audio second. Windows go
    through the analyser one by one, as a session's do (with `stream` named, the analyser's
    feature cache, when it has one, serves this stream)."""
    chunker = Chunker(chunk, left, stream=stream)
    windows = chunker.push(audio) + chunker.finish()
    pieces: dict[str, list[np.ndarray]] = {}
    started = time.perf_counter()
    for window in windows:
        (outputs,) = analyser.window_outputs([window])
        assert outputs is not None
        span = chunk_frames(len(window.audio), window.chunk_start, window.chunk_end)
        assert window.audio_start // STRIDE + span.first == sum(
            len(p) for p in pieces.get("hidden", [])
        ), "frames of consecutive chunks must tile"
        for name, value in outputs.items():
            if value.ndim == 2:  # per-frame outputs
                pieces.setdefault(name, []).append(value[span.first : span.first + span.count])
    cost = (time.perf_counter() - started) / (len(audio) / RATE)
    analyser.release(stream)
    return {name: np.concatenate(parts) for name, parts in pieces.items()}, cost


def compare(streamed: dict[str, np.ndarray], whole: dict[str, np.ndarray]) -> dict[str, float]:
    h1, h2 = streamed["hidden"], whole["hidden"][0]
    assert h1.shape == h2.shape, (h1.shape, h2.shape)
    cosine = np.sum(h1 * h2, axis=1) / (np.linalg.norm(h1, axis=1) * np.linalg.norm(h2, axis=1))
    row = {"hidden_cosine_mean": float(cosine.mean()), "hidden_cosine_min": float(cosine.min())}
    if "logits" in streamed:
        agree = streamed["logits"].argmax(-1) == whole["logits"][0].argmax(-1)
        row["ctc_argmax_agreement"] = float(agree.mean())
    return row


def measure(
    analyser: Wav2Vec2Analyser,
    audio: np.ndarray,
    chunk_seconds: float,
    contexts: list[float],
    reference: Wav2Vec2Analyser | None = None,
) -> list[dict[str, Any]]:
    """One row per left context. With the analyser's feature cache on, each row also says what
    fraction of the windows' frames the conv encoder computed (1.0 without reuse). The whole
    utterance goes through `reference` when given (the fp32 conv encoder, where `analyser` runs
    the int8 one: the comparison then includes what int8 changes)."""
    whole = (reference or analyser).run_batch(audio[None])
    reuse = analyser.feature_cache is not None
    rows = []
    for left_seconds in contexts:
        left = max(STRIDE, round(left_seconds * RATE / STRIDE) * STRIDE)
        windowed, encoded = analyser.frames_windowed, analyser.frames_encoded
        streamed, cost = streamed_outputs(
            analyser, audio, round(chunk_seconds * RATE), left, stream="fidelity"
        )
        rows.append(
            {
                "chunk_seconds": chunk_seconds,
                "left_context_seconds": left / RATE,
                "feature_reuse": reuse,
                "encoded_fraction": (analyser.frames_encoded - encoded)
                / max(1, analyser.frames_windowed - windowed),
                "compute_seconds_per_audio_second": cost,
                **compare(streamed, whole),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| chunk s | left context s | feature reuse (encoded) | CTC argmax agreement |"
        " hidden cosine mean | min | compute s / audio s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        agreement = r.get("ctc_argmax_agreement")
        reuse = f"yes ({r['encoded_fraction']:.2f})" if r["feature_reuse"] else "no"
        lines.append(
            f"| {r['chunk_seconds']:.2f} | {r['left_context_seconds']:.2f} | {reuse} | "
            f"{'-' if agreement is None else f'{agreement:.3f}'} | "
            f"{r['hidden_cosine_mean']:.4f} | {r['hidden_cosine_min']:.4f} | "
            f"{r['compute_seconds_per_audio_second']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from models.training.evaluate import EVAL_SETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--variant", default="fp32", choices=["fp32", "fp32-opt", "int8"])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--chunk", type=float, nargs="+", default=[1.0])
    parser.add_argument("--contexts", type=float, nargs="+", default=[0.02, 0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--wav", help="use this file (mono 16 kHz after reading) instead")
    parser.add_argument(
        "--heldout",
        type=int,
        metavar="N",
        help="use N sentences of an evaluation set (models/training), 0.3 s apart, instead",
    )
    parser.add_argument(
        "--set",
        default="unseen",
        choices=EVAL_SETS,
        help="--heldout's set: unseen text in unseen voices, or the old grammar's held-out set",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--norm-seconds",
        type=float,
        default=10.0,
        help="group-norm checkpoints: the first conv's normalisation over each stream's last N "
        "seconds (the server's analysis_norm_seconds); 0 = over each window",
    )
    parser.add_argument(
        "--encoder",
        choices=["fp32", "int8"],
        default="fp32",
        help="the streamed side's conv encoder (the server's analysis_encoder; int8: int8 "
        "variants of group-norm checkpoints); the whole utterance always runs the fp32 one",
    )
    parser.add_argument(
        "--feature-reuse",
        choices=["off", "on", "both"],
        default="both",
        help="reuse conv features across overlapping windows (the server's feature cache)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from models.export import ensure_artifact

    artifact = ensure_artifact(args.model, args.variant)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.feature_reuse]
    analysers = [
        Wav2Vec2Analyser(
            artifact.folder,
            args.threads,
            feature_cache=reuse,
            norm_seconds=args.norm_seconds,
            encoder=args.encoder,
        )
        for reuse in modes
    ]
    reference = Wav2Vec2Analyser(artifact.folder, args.threads) if args.encoder != "fp32" else None
    if args.wav:
        import soundfile as sf
        import soxr

        audio, rate = sf.read(args.wav, dtype="float32", always_2d=True)
        audio = soxr.resample(audio.mean(axis=1), rate, RATE).astype(np.float32)
    elif args.heldout:
        from models.training.evaluate import eval_clips

        gap = np.zeros(round(0.3 * RATE), np.float32)
        clips = eval_clips(args.set, args.heldout)
        audio = np.concatenate([part for _, a in clips for part in (a, gap)])
    else:
        audio = synthetic_audio(args.seconds)
    rows = []
    for chunk in args.chunk:
        for analyser in analysers:
            reuse = "with" if analyser.feature_cache is not None else "without"
            print(
                f"measuring chunk {chunk} s over contexts {args.contexts}, {reuse} feature reuse",
                flush=True,
            )
            rows += measure(analyser, audio, chunk, args.contexts, reference)
    analyser = analysers[0]
    print(
        f"\n{args.model} ({args.variant}, {analyser.encoder} conv encoder, trained: "
        f"{analyser.trained}, conv feature norm: {analyser.meta.get('feat_extract_norm')}), "
        f"{len(audio) / RATE:.1f} s of audio\n"
    )
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "variant": args.variant,
        "trained": analyser.trained,
        "feat_extract_norm": analyser.meta.get("feat_extract_norm"),
        "encoder": analyser.encoder,
        "norm_seconds": args.norm_seconds if analyser.stream_norm is not None else None,
        "audio_seconds": len(audio) / RATE,
        "source": args.wav
        or (f"{args.heldout} sentences of the {args.set} set" if args.heldout else "synthetic"),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    suffix = "-int8-encoder" if analyser.encoder == "int8" else ""
    path = out / f"fidelity-{args.model}-{args.variant}{suffix}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
