"""Held-out evaluation of a trained CTC model: CER and WER, whole utterance and streamed (the
server's chunking emulated, see streaming.py), decoded greedily, by beam search, and by beam
search with the model's character LM (`language_model/`, models/training/lm.py) where it has one.

`python -m models.training.evaluate --model models/weights/tiny-espeak [--json out.json]`

Two evaluation sets (`--set`), each clean, one deterministic voice per sentence:
- `unseen` (the headline): sentences of a text source that no part of the model is trained or
  tuned on (sources.py: fortune cookies) spoken by held-out voices of the broad pool: espeak-ng
  base voices and variants never in training, and a festival voice never in training (synth.py);
- `grammar`: the old grammar's held-out sentences (`data/heldout.txt`, never in training) spoken
  by held-out espeak-ng voices: in the training distribution's text, kept to compare with
  earlier figures.
`eval_clips()` is public so that the same clips can be streamed through the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.char_lm import find_language_model
from models.presets import BASE_960H_VOCAB
from models.training.corpus import heldout_sentences
from models.training.sources import eval_sentences
from models.training.streaming import Streaming, streamed_logits
from models.training.synth import random_broad_voice, random_voice, synthesize_many
from models.wav2vec2_runtime import normalise
from stream.core.text.ctc_beam import BeamSettings, CtcBeamDecoder
from stream.core.text.transcript import CtcVocabulary

HELDOUT_SEED = 1234  # fixes which held-out voice, speed and pitch speaks each sentence
UNSEEN_SEED = 4321  # the same for the unseen set
EVAL_SETS = ("unseen", "grammar")
# The shipped model's vocabulary: base-960h's, "<pad>" (id 0) is the CTC blank.
VOCABULARY = CtcVocabulary.from_tokens(BASE_960H_VOCAB, blank_id=0)


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def cer(ref: str, hyp: str) -> float:
    """Character error rate of one pair: edits / reference characters (spaces count)."""
    return edit_distance(ref, hyp) / max(len(ref), 1)


def wer(ref: str, hyp: str) -> float:
    """Word error rate of one pair: word edits / reference words."""
    return edit_distance(ref.split(), hyp.split()) / max(len(ref.split()), 1)


def heldout_clips(limit: int | None = None, processes: int = 2) -> list[tuple[str, np.ndarray]]:
    """(normalised text, float32 16 kHz audio) for each held-out sentence, in file order.

    Deterministic: the voice of sentence i is drawn from a generator seeded with HELDOUT_SEED.
    The audio is clean and not normalised (the model's runner normalises).
    """
    texts = heldout_sentences()[:limit]
    rng = np.random.default_rng(HELDOUT_SEED)
    voices = [random_voice(rng, heldout=True) for _ in texts]
    audio = synthesize_many(list(zip(texts, voices)), processes=processes, desc="held-out audio")
    return list(zip(texts, audio))


def unseen_clips(limit: int | None = None, processes: int = 2) -> list[tuple[str, np.ndarray]]:
    """(normalised text, float32 16 kHz audio) for the unseen set: sentences of an evaluation-only
    text source, each in a held-out voice of the broad pool (deterministic, UNSEEN_SEED)."""
    texts = eval_sentences()[:limit]
    rng = np.random.default_rng(UNSEEN_SEED)
    voices = [random_broad_voice(rng, heldout=True) for _ in texts]
    audio = synthesize_many(list(zip(texts, voices)), processes=processes, desc="unseen audio")
    return list(zip(texts, audio))


def eval_clips(name: str, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """An evaluation set by name (EVAL_SETS)."""
    if name not in EVAL_SETS:
        raise ValueError(f"no evaluation set {name!r}: {', '.join(EVAL_SETS)}")
    return unseen_clips(limit) if name == "unseen" else heldout_clips(limit)


def ctc_greedy(ids: Sequence[int]) -> str:
    """Collapse repeats, drop blanks and special tokens, "|" becomes a space: the server's own
    decoding (stream/core/text/transcript.py)."""
    return VOCABULARY.decode(ids)


def beam_decoder(
    folder: str | Path | None = None, width: int = BeamSettings.width
) -> CtcBeamDecoder:
    """The server's beam search, with the character LM of the model folder when it has one."""
    found = find_language_model(Path(folder)) if folder is not None else None
    if found is None:
        return CtcBeamDecoder(VOCABULARY, BeamSettings(width))
    return CtcBeamDecoder(VOCABULARY, BeamSettings(width, found.alpha, found.beta), found.lm)


@torch.no_grad()
def log_probs(
    model: torch.nn.Module, audio: np.ndarray, streaming: Streaming | None = None
) -> np.ndarray:
    """(frames, vocabulary) CTC log-probabilities of one utterance (normalised like the server
    does): whole, or chunk by chunk as the server would analyse it with `streaming`."""
    if streaming is None:
        logits = model(torch.from_numpy(normalise(audio))[None]).logits[0]
    else:
        padded, lengths = streamed_logits(model, [audio], streaming)
        logits = padded[0, : int(lengths[0])]
    return logits.float().log_softmax(-1).numpy()


def decode(frames: np.ndarray, decoder: CtcBeamDecoder | None = None) -> str:
    """Log-probabilities -> text: greedy, or by `decoder` (a sentence each call)."""
    if decoder is None:
        return ctc_greedy(frames.argmax(-1).tolist())
    decoder.advance(frames)
    return decoder.finish()


def transcribe(
    model: torch.nn.Module,
    audio: np.ndarray,
    streaming: Streaming | None = None,
    decoder: CtcBeamDecoder | None = None,
) -> str:
    """CTC transcript of one utterance: whole or streamed, greedy or by `decoder`."""
    return decode(log_probs(model, audio, streaming), decoder)


@dataclass
class Utterance:
    ref: str
    hyp: str
    cer: float
    wer: float


# A clip's text and its log-probabilities whole and streamed at the server's defaults: the
# model runs once, and each decoder reads the same frames.
Paths = tuple[str, np.ndarray, np.ndarray]


def paths(model: torch.nn.Module, clips: Sequence[tuple[str, np.ndarray]]) -> list[Paths]:
    """Each clip's Paths (model put in eval mode)."""
    model.eval()
    return [(ref, log_probs(model, a), log_probs(model, a, Streaming())) for ref, a in clips]


def decode_paths(
    data: Sequence[Paths], decoder: CtcBeamDecoder | None = None
) -> tuple[list[Utterance], list[Utterance]]:
    """Whole and streamed results of each clip, greedy or by `decoder`."""
    columns: tuple[list[Utterance], list[Utterance]] = ([], [])
    for ref, *frames in data:
        for column, frames_of_path in zip(columns, frames):
            hyp = decode(frames_of_path, decoder)
            column.append(Utterance(ref, hyp, cer(ref, hyp), wer(ref, hyp)))
    return columns


def per_sentence(
    model: torch.nn.Module,
    clips: Sequence[tuple[str, np.ndarray]],
    streaming: Streaming | None = None,
    decoder: CtcBeamDecoder | None = None,
) -> list[Utterance]:
    """Transcribe each clip (whole, or streamed; greedy, or by `decoder`); one result per
    sentence (model put in eval mode)."""
    model.eval()
    results = []
    for ref, audio in clips:
        hyp = transcribe(model, audio, streaming, decoder)
        results.append(Utterance(ref, hyp, cer(ref, hyp), wer(ref, hyp)))
    return results


def summarize(results: Sequence[Utterance]) -> dict[str, float]:
    """Corpus CER/WER: total edits over total reference characters / words."""
    chars = sum(len(r.ref) for r in results)
    words = sum(len(r.ref.split()) for r in results)
    char_edits = sum(edit_distance(r.ref, r.hyp) for r in results)
    word_edits = sum(edit_distance(r.ref.split(), r.hyp.split()) for r in results)
    return {
        "cer": char_edits / max(chars, 1),
        "wer": word_edits / max(words, 1),
        "sentences": len(results),
    }


def score_set(
    model: torch.nn.Module, name: str, folder: Path, limit: int | None = None
) -> dict[str, Any]:
    """An evaluation set's corpus CER/WER, whole and streamed, greedy and with the folder's
    character LM (where it has one), and its first sentences' transcripts."""
    data = paths(model, eval_clips(name, limit))  # the model runs once per path
    decoders: dict[str, CtcBeamDecoder | None] = {"greedy": None}
    if find_language_model(folder) is not None:
        decoders["lm"] = beam_decoder(folder)
    scores: dict[str, Any] = {}
    for decoding, decoder in decoders.items():
        whole, streamed = decode_paths(data, decoder)
        scores[decoding] = {"whole": summarize(whole), "streamed": summarize(streamed)}
        scores[f"{decoding}_examples"] = [
            {"ref": w.ref, "whole": w.hyp, "streamed": s.hyp} for w, s in zip(whole[:5], streamed)
        ]
    return scores


def describe_scores(scores: dict[str, Any]) -> str:
    """One line: CER (WER) whole / streamed for each decoding of a `score_set` result."""
    parts = []
    for decoding in ("greedy", "lm"):
        if decoding in scores:
            w, s = scores[decoding]["whole"], scores[decoding]["streamed"]
            parts.append(
                f"{decoding} {w['cer']:.2%} ({w['wer']:.1%}) whole, "
                f"{s['cer']:.2%} ({s['wer']:.1%}) streamed"
            )
    return "; ".join(parts)


def load_model(folder: str | Path) -> torch.nn.Module:
    from transformers import Wav2Vec2ForCTC

    model = Wav2Vec2ForCTC.from_pretrained(str(folder), attn_implementation="eager")
    return model.float().eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by save_pretrained")
    parser.add_argument("--json", type=Path, help="write summary and per-sentence results here")
    parser.add_argument("--limit", type=int, help="only the first N sentences")
    parser.add_argument("--set", default="unseen", choices=EVAL_SETS, help="evaluation set")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = load_model(args.model)
    clips = eval_clips(args.set, args.limit)
    decoders = {"greedy": None, "beam": beam_decoder()}
    if find_language_model(Path(args.model)) is not None:
        decoders["beam+lm"] = beam_decoder(args.model)
    data = paths(model, clips)
    payload: dict[str, Any] = {}
    for name, decoder in decoders.items():
        whole, streamed = decode_paths(data, decoder)
        payload[name] = {"whole": summarize(whole), "streamed": summarize(streamed)}
        payload[f"{name}_results"] = [
            {"ref": w.ref, "whole": w.hyp, "streamed": s.hyp} for w, s in zip(whole, streamed)
        ]
    print(f"{args.set}, {len(clips)} sentences\n\n| decoding | CER whole | CER streamed | gap |")
    print("| --- | --- | --- | --- |")
    for name in decoders:
        whole_cer, streamed_cer = (payload[name][k]["cer"] for k in ("whole", "streamed"))
        gap = 100 * (streamed_cer - whole_cer)
        print(f"| {name} | {whole_cer:.2%} | {streamed_cer:.2%} | {gap:+.2f} |")
    for row in payload[list(decoders)[-1] + "_results"][:5]:
        print(f"\nREF    {row['ref']}\nWHOLE  {row['whole']}\nSTREAM {row['streamed']}")
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
