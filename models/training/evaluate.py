"""Held-out evaluation of a trained CTC model: greedy decoding, CER and WER, whole utterance
and streamed (the server's chunking emulated, see streaming.py).

`python -m models.training.evaluate --model models/weights/tiny-espeak [--json out.json]`

The held-out set is `data/heldout.txt` (sentences never in training) spoken by held-out voices
(base voices and variants never in training, see synth.py), clean, one deterministic voice per
sentence. `heldout_clips()` is public so that the same clips can be streamed through the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.presets import BASE_960H_VOCAB
from models.training.corpus import heldout_sentences
from models.training.streaming import Streaming, streamed_logits
from models.training.synth import random_voice, synthesize_many
from models.wav2vec2_runtime import normalise
from stream.core.transcript import CtcVocabulary

HELDOUT_SEED = 1234  # fixes which held-out voice, speed and pitch speaks each sentence
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


def ctc_greedy(ids: Sequence[int]) -> str:
    """Collapse repeats, drop blanks and special tokens, "|" becomes a space: the server's own
    decoding (stream/core/transcript.py)."""
    return VOCABULARY.decode(ids)


@torch.no_grad()
def transcribe(
    model: torch.nn.Module, audio: np.ndarray, streaming: Streaming | None = None
) -> str:
    """Greedy CTC transcript of one utterance (normalised like the server does): whole, or
    chunk by chunk as the server would analyse it with `streaming`."""
    if streaming is None:
        logits = model(torch.from_numpy(normalise(audio))[None]).logits[0]
    else:
        padded, lengths = streamed_logits(model, [audio], streaming)
        logits = padded[0, : int(lengths[0])]
    return ctc_greedy(logits.argmax(-1).tolist())


@dataclass
class Utterance:
    ref: str
    hyp: str
    cer: float
    wer: float


def per_sentence(
    model: torch.nn.Module,
    clips: Sequence[tuple[str, np.ndarray]],
    streaming: Streaming | None = None,
) -> list[Utterance]:
    """Transcribe each clip (whole, or streamed); one result per sentence (model put in eval
    mode)."""
    model.eval()
    results = []
    for ref, audio in clips:
        hyp = transcribe(model, audio, streaming)
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


def load_model(folder: str | Path) -> torch.nn.Module:
    from transformers import Wav2Vec2ForCTC

    model = Wav2Vec2ForCTC.from_pretrained(str(folder), attn_implementation="eager")
    return model.float().eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by save_pretrained")
    parser.add_argument("--json", type=Path, help="write summary and per-sentence results here")
    parser.add_argument("--limit", type=int, help="only the first N held-out sentences")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = load_model(args.model)
    clips = heldout_clips(args.limit)
    whole = per_sentence(model, clips)
    streamed = per_sentence(model, clips, Streaming())
    for r, s in list(zip(whole, streamed))[:10]:
        print(f"REF    {r.ref}\nWHOLE  {r.hyp}\nSTREAM {s.hyp}\n")
    summaries = {"whole": summarize(whole), "streamed": summarize(streamed)}
    for name, summary in summaries.items():
        print(
            f"held-out {name:8s} CER {summary['cer']:.2%}  WER {summary['wer']:.2%}"
            f"  ({len(whole)} sentences)"
        )
    if args.json:
        payload = {
            **summaries,
            "whole_results": [asdict(r) for r in whole],
            "streamed_results": [asdict(r) for r in streamed],
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
