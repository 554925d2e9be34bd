"""The shipped model's character language model: trained on broad text, its beam-search
weights tuned on sentences that neither it nor the acoustic model ever saw.

    python -m models.training.lm --model models/weights/tiny-espeak

Steps: DEV_SENTENCES of the training sources' dev split (sources.py: sentences of the same
sources that are in no train list), spoken by train voices of the broad pool; the acoustic
model's log-probabilities for them, whole and streamed at the server's defaults (PyTorch, as
`evaluate` computes them); prefix beam search over a grid of LM orders, weights (alpha) and
per-character bonuses (beta) with LMs trained on every training source's train split (pruned:
n-grams of 4+ characters seen once are dropped); the setting with the lowest mean of whole and
streamed CER (or, within SIZE_TOLERANCE of it, the lowest order's: the smallest file) is
written into the model folder's `language_model/` (models/char_lm.py), the grid's results
beside it in attrs.json. Neither evaluation set is looked at: the unseen set's text source is
in no part of this, so it stays a fair test of the result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.char_lm import CharNgramLM, write_folder
from models.training import evaluate
from models.training.sources import broad_train_sentences, dev_split
from models.training.synth import random_broad_voice, synthesize_many
from stream.core.text.ctc_beam import BeamSettings, CtcBeamDecoder

DEV_SENTENCES = 200
DEV_SEED = 99  # which train voice speaks each dev sentence
ORDERS = (5, 6, 7)
ALPHAS = (0.3, 0.5, 0.7)
BETAS = (0.5, 1.0, 1.5, 2.0)
MIN_COUNT = 2  # n-grams of 4+ characters seen fewer times are pruned (char_lm.py)
BEAM_WIDTH = BeamSettings().width  # the server's default (--ctc-beam-width)
# A lower order is chosen when its dev CER (mean of whole and streamed) is at most half a point
# worse: each order up doubles the file (broad text, min count 2: 5-gram 3.1 MB, 6-gram 8.4 MB,
# 7-gram 17.0 MB of ARPA), and every server that starts the model reads and holds it.
SIZE_TOLERANCE = 0.005


def dev_paths(model: torch.nn.Module, limit: int = DEV_SENTENCES) -> list[evaluate.Paths]:
    """Each dev sentence's text and log-probabilities, whole and streamed."""
    texts = dev_split()[:limit]
    rng = np.random.default_rng(DEV_SEED)
    voices = [random_broad_voice(rng) for _ in texts]
    audio = synthesize_many(list(zip(texts, voices)), processes=2, desc="dev audio")
    return evaluate.paths(model, list(zip(texts, audio)))


def corpus_cer(
    data: Sequence[evaluate.Paths], decoder: CtcBeamDecoder | None = None
) -> tuple[float, float]:
    """Corpus CER, whole and streamed, greedy or by `decoder`."""
    whole, streamed = evaluate.decode_paths(data, decoder)
    return evaluate.summarize(whole)["cer"], evaluate.summarize(streamed)["cer"]


def train_text(limit: int | None = None) -> list[str]:
    """Every training source's train split (sources.py), the grammar's among them; with
    `limit`, that many of each source's first sentences (quick runs)."""
    return [s for group in broad_train_sentences().values() for s in group[:limit]]


def train_lm(order: int, text_limit: int | None = None) -> CharNgramLM:
    return CharNgramLM.train(train_text(text_limit), order, min_count=MIN_COUNT)


def tune(
    data: Sequence[evaluate.Paths],
    lms: dict[int, CharNgramLM],
    alphas: Sequence[float] = ALPHAS,
    betas: Sequence[float] = BETAS,
) -> list[dict[str, float]]:
    """Every grid point's dev CER (`lms`: an LM per order), best first."""
    rows = []
    grid = list(itertools.product(sorted(lms), alphas, betas))
    for order, alpha, beta in tqdm(grid, desc="LM grid", unit="setting"):
        settings = BeamSettings(BEAM_WIDTH, alpha, beta)
        decoder = CtcBeamDecoder(evaluate.VOCABULARY, settings, lms[order])
        whole, streamed = corpus_cer(data, decoder)
        rows.append(
            {"order": order, "alpha": alpha, "beta": beta, "whole": whole, "streamed": streamed}
        )
    rows.sort(key=mean_cer)
    return rows


def mean_cer(row: dict[str, float]) -> float:
    """A grid point's score: the mean of its whole and streamed dev CER."""
    return (row["whole"] + row["streamed"]) / 2


def choose(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The best row of `tune`'s grid, or a lower order's best within SIZE_TOLERANCE of it."""
    near = [r for r in rows if mean_cer(r) <= mean_cer(rows[0]) + SIZE_TOLERANCE]
    return min(near, key=lambda r: (r["order"], mean_cer(r)))


def build(
    model_folder: Path,
    model: torch.nn.Module | None = None,
    limit: int = DEV_SENTENCES,
    orders: Sequence[int] = ORDERS,
    alphas: Sequence[float] = ALPHAS,
    betas: Sequence[float] = BETAS,
    text_limit: int | None = None,
) -> dict[str, float]:
    """Tune on the dev sentences and write `language_model/` into the model folder; returns
    the chosen setting with its dev CER. `model`: the folder's, if already in memory."""
    model = evaluate.load_model(model_folder) if model is None else model
    data = dev_paths(model, limit)
    text = train_text(text_limit)  # read once for every order
    lms = {
        o: CharNgramLM.train(text, o, min_count=MIN_COUNT)
        for o in tqdm(orders, desc="LMs", unit="order")
    }
    rows = tune(data, lms, alphas, betas)
    best = choose(rows)
    greedy_whole, greedy_streamed = corpus_cer(data)
    lm = lms[int(best["order"])]
    sizes = {s: len(group[:text_limit]) for s, group in broad_train_sentences().items()}
    write_folder(
        model_folder, lm, best["alpha"], best["beta"],
        trained_on={"sentences_by_source": sizes, "min_count": MIN_COUNT},
        tuned_on=f"{len(data)} dev sentences (models/training/lm.py), train voices",
        dev_greedy={"whole": greedy_whole, "streamed": greedy_streamed}, grid=rows,
    )  # fmt: skip
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="trained model folder")
    parser.add_argument("--limit", type=int, default=DEV_SENTENCES, help="dev sentences")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    best = build(args.model, limit=args.limit)
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
