"""What CTC decoding costs and buys: greedy vs beam search vs beam search with a character LM.

The shipped tiny model's (or --model's) ONNX artifact computes the log-probabilities of an
evaluation set's sentences once (models/training/evaluate.py: `unseen` by default, or
`grammar`), streamed as the server analyses them (1 s chunks with 1 s of left context); then
each decoder takes them chunk by chunk, as a session's stitcher does, and is timed (process
CPU time, one thread, the second of two passes: the LM's score cache warm, as in a server that
has run a while) and scored (CER against the sentences). The figure that matters for capacity
is decoding CPU per audio second next to the model's own (analysis_kernels).

    python -m benchmarks.ctc_decoding                 # the unseen set's 200 sentences
    python -m benchmarks.ctc_decoding --set grammar   # the grammar's 150 held-out sentences
    python -m benchmarks.ctc_decoding --quick         # 8 sentences, fewer decoders
    python -m benchmarks.ctc_decoding --model DIR --out D.json   # another model folder's LM
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.analysis_kernels import machine_info, pyplot, save_figure
from models.base import ANALYSIS_SAMPLE_RATE
from models.char_lm import find_language_model
from models.frames import STRIDE
from models.training.evaluate import EVAL_SETS, Utterance, cer, eval_clips, summarize, wer
from models.training.streaming import Streaming
from stream.core.audio.chunker import Chunker
from stream.core.text.ctc_beam import BeamSettings, BeamTranscriptStitcher, CtcBeamDecoder
from stream.core.text.transcript import CtcVocabulary, TranscriptStitcher

FRAMES_PER_SECOND = ANALYSIS_SAMPLE_RATE // STRIDE  # wav2vec2's 20 ms frames


def streamed_log_probs(analyser: Any, audio: np.ndarray) -> list[np.ndarray]:
    """Each chunk's (frames, vocabulary) log-probabilities, by the server's own path: its
    chunker at the default chunk and context, and the analyser's result for each window."""
    defaults = Streaming()
    chunker = Chunker(defaults.chunk, defaults.context, defaults.lookahead)
    windows = chunker.push(audio) + chunker.finish()
    results = (analyser.analyse([window])[0] for window in windows)
    return [r.log_probs for r in results if r.log_probs is not None]


def run_decoder(
    make: Any, refs: list[str], clips: list[list[np.ndarray]]
) -> tuple[dict[str, float], float]:
    """Corpus CER/WER of one decoder over the clips, and its CPU seconds."""
    results = []
    cpu = 0.0
    for ref, chunks in zip(refs, clips):
        stitcher = make()
        start = time.process_time()
        frame = 0
        for chunk in chunks:
            data = chunk.argmax(-1).tolist() if stitcher.needs == "tokens" else chunk
            stitcher.push(frame, data)
            frame += len(chunk)
        final = stitcher.flush()
        cpu += time.process_time() - start
        hyp = final["text"] if final else ""
        results.append(Utterance(ref, hyp, cer(ref, hyp), wer(ref, hyp)))
    return summarize(results), cpu


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| decoder | beam width | CER % | WER % | ms CPU per audio s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['decoder']} | {r['width'] or '-'} | {100 * r['cer']:.2f} | "
            f"{100 * r['wer']:.2f} | {r['ms_per_audio_s']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """CER against decoding cost, one line per decoder over widths; False without matplotlib."""
    if (plt := pyplot()) is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for decoder in dict.fromkeys(r["decoder"] for r in rows):  # one line per decoder, by width
        mine = [r for r in rows if r["decoder"] == decoder]
        xs, ys = [r["ms_per_audio_s"] for r in mine], [100 * r["cer"] for r in mine]
        ax.plot(xs, ys, marker="o", label=decoder)
        for r, x, y in zip(mine, xs, ys):
            if r["width"]:
                ax.annotate(f"w{r['width']}", (x, y), fontsize=8, xytext=(3, 4),
                            textcoords="offset points")  # fmt: skip
    ax.set(xlabel="decoding ms CPU per audio second", ylabel="CER % (streamed)")
    ax.grid(alpha=0.3)
    save_figure(plt, fig, ax, path, title)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a preset or folder with language_model/")
    parser.add_argument("--variant", default="int8", choices=["fp32", "fp32-opt", "int8"])
    parser.add_argument("--set", default="unseen", choices=EVAL_SETS, help="evaluation set")
    parser.add_argument("--limit", type=int, help="first N sentences (default all)")
    parser.add_argument("--quick", action="store_true", help="8 sentences, widths 4 and 8")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ctc_decoding.json"))
    args = parser.parse_args(argv)

    from models.export import ensure_artifact
    from models.wav2vec2_runtime import Wav2Vec2Analyser

    limit = 8 if args.quick else args.limit
    widths = (4, 8) if args.quick else (2, 4, 8, 16, 32)
    print(f"synthesising the {args.set} set (cached after the first run)...", file=sys.stderr)
    clips = eval_clips(args.set, limit)
    artifact = ensure_artifact(args.model, args.variant)
    assert artifact.spec.path is not None
    found = find_language_model(Path(artifact.spec.path))
    if found is None:
        raise SystemExit(f"{args.model} has no language_model/ (python -m models.training.lm)")
    analyser = Wav2Vec2Analyser(artifact.folder, threads=2)
    vocabulary = CtcVocabulary.from_tokens(*analyser.ctc_vocabulary)
    print(f"computing log-probabilities of {len(clips)} streamed clips...", file=sys.stderr)
    refs = [text for text, _ in clips]
    streamed = [streamed_log_probs(analyser, audio) for _, audio in clips]
    audio_s = sum(len(chunk) for chunks in streamed for chunk in chunks) / FRAMES_PER_SECOND

    contenders: list[tuple[str, int | None, Any]] = [
        ("greedy", None, lambda: TranscriptStitcher(vocabulary))
    ]
    for width in widths:
        for name, lm in (("beam", None), ("beam+lm", found)):
            settings = BeamSettings(width, lm.alpha, lm.beta) if lm else BeamSettings(width)
            contenders.append(
                (name, width, lambda s=settings, m=lm: BeamTranscriptStitcher(
                    CtcBeamDecoder(vocabulary, s, m.lm if m else None)))
            )  # fmt: skip
    rows = []
    for name, width, make in contenders:
        print(f"decoding: {name}" + (f", width {width}" if width else ""), file=sys.stderr)
        run_decoder(
            make, refs, streamed
        )  # warm-up: fills the LM's score cache, as a live server has
        scores, cpu = run_decoder(make, refs, streamed)
        rows.append({
            "decoder": name, "width": width, "cer": scores["cer"], "wer": scores["wer"],
            "cpu_s": round(cpu, 4), "ms_per_audio_s": 1000 * cpu / audio_s,
        })  # fmt: skip
    title = (
        f"{args.model} ({args.variant}) streamed at 1 s + 1 s, {len(clips)} held-out sentences, "
        f"{audio_s:.0f} s of speech ({args.set} set)"
    )
    print(f"\n{title}\n\n{table(rows)}")
    report = {
        "model": args.model, "variant": args.variant, "set": args.set, "sentences": len(clips),
        "audio_seconds": audio_s, "language_model": found.describe(), "rows": rows,
        "machine": machine_info(1), "quick": args.quick,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    png = args.out.with_suffix(".png")
    print(f"wrote {png}" if plot(rows, png, title) else "matplotlib is not installed: no chart")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
