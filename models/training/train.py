"""Train a small wav2vec2 CTC model from scratch on synthetic speech, on CPU, in a time budget.

    python -m models.training.train --out models/weights/tiny-espeak [--minutes 75] [--seed 0]
    python -m models.training.train --out /tmp/m --quick      # a smoke test: seconds

Steps: the training clips: every grammar sentence RENDITIONS times and BROAD_CLIPS sentences of
the broad text sources (sources.py: WordNet's examples, the GCIDE's quotations) once, each in a
random train voice of the broad pool (synth.py: espeak-ng and festival; flite's too with
--flite), synthesised once and cached; train with on-the-fly augmentation, length-bucketed
batches, AdamW with warmup + cosine decay; write config.json, model.safetensors, vocab.json and
metrics.json; then the character LM for beam search (lm.py: trained on the broad text, tuned on
its dev split), and both evaluation sets (evaluate.py: `unseen`, the headline, and `grammar`),
whole and streamed, greedy and with the LM.

Streaming-shaped training: on a share of the steps (`--stream-share`) the CTC loss is put on the
server's streamed path instead of the whole utterance (streaming.py: the same chunker, windows
and frame spans), with a random phase of the chunk grid, so the model learns to emit each
character with only the left context and look-ahead the server will give it.

The LR schedule runs on progress = max(step / steps, elapsed / budget): on an idle machine the
step count governs (so a run is repeatable for a seed), on a busy one the clock does, and the
schedule still ends at its low LR when the budget is spent.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import Wav2Vec2ForCTC

from models.presets import BASE_960H_VOCAB
from models.training import evaluate, lm
from models.training.architecture import ARCHITECTURES, DEFAULT_ARCHITECTURE, model_config
from models.training.corpus import normalize, train_sentences
from models.training.sources import TRAIN_SOURCES, dev_split, pick, read_list
from models.training.streaming import Streaming, streamed_ctc_loss
from models.training.synth import (
    SAMPLE_RATE,
    Voice,
    augment,
    random_broad_voice,
    synthesize_many,
)
from models.wav2vec2_runtime import normalise

RENDITIONS = 2  # voices per grammar sentence, fixed by the seed, cached on disk
BROAD_CLIPS = 24000  # broad-text sentences, one voice each: about what a run's steps can see
BATCH_SECONDS = 12.0  # padded audio per batch
PEAK_LR = 1.5e-3
WARMUP = 0.04  # fraction of progress
CURRICULUM_SHARE = 0.2  # of the first epoch's batches that go shortest first (make_batches)
AUGMENT_RAMP = 0.15  # fraction of progress over which augmentation goes from never to always
STEPS = 15000  # nominal schedule length; the 75-min clock ended the shipped run at 9,559
STREAM_SHARE = 0.5  # fraction of steps whose loss is on the streamed path, once it is on
STREAM_FROM = 0.5  # from scratch, the streamed loss starts at this fraction of progress
STREAM_RAMP = 0.1  # and ramps up to STREAM_SHARE over this fraction
STREAM_CHUNKS = (1.0, 1.0, 1.0, 0.5, 2.0)  # seconds: mostly the server default, some others
STREAM_CONTEXTS = (1.0, 1.0, 1.0, 0.5, 2.0)
MONITOR_EVERY_S = 300.0
MONITOR_CLIPS = 24
TOKEN_IDS = {token: i for i, token in enumerate(BASE_960H_VOCAB)}


def fastest_attention(
    model: Wav2Vec2ForCTC, bf16: bool, repeats: int = 4
) -> tuple[str, dict[str, float]]:
    """The faster attention kernel for a training step on this CPU, and each one's best time.

    The same arithmetic either way, but which is faster depends on the CPU: on an AMD EPYC
    (AVX512-BF16, no AMX) PyTorch's fused kernel ("sdpa") lost to plain matmul-softmax-matmul
    ("eager") at these 150-frame sequences, most of all in its backward (one run, alternating
    steps: 0.252 -> 0.219 s per whole-utterance batch, 0.454 -> 0.369 streamed). Timed on a copy
    of the model, forward and backward of a 12 s batch, alternating kernels: a few seconds.
    """
    probe = copy.deepcopy(model).train()
    rng = np.random.default_rng(0)
    clips = [rng.normal(0.0, 0.1, 3 * SAMPLE_RATE).astype(np.float32) for _ in range(4)]
    batch = collate(clips, [[5] * 40] * 4)
    times: dict[str, list[float]] = {"eager": [], "sdpa": []}
    for _ in range(repeats + 1):  # the first round warms up
        for kernel, runs in times.items():
            probe.set_attn_implementation(kernel)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = probe(**batch).loss
            loss.backward()
            runs.append(time.perf_counter() - start)
    best = {kernel: min(runs[1:]) for kernel, runs in times.items()}
    return min(best, key=lambda kernel: best[kernel]), best


def bf16_supported() -> bool:
    """bf16 autocast pays on CPUs with native bf16 dot products (AVX512-BF16 or AMX); on
    others PyTorch emulates it, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def encode(text: str) -> list[int]:
    """Normalised text -> CTC label ids (space is the word delimiter "|")."""
    return [TOKEN_IDS["|" if ch == " " else ch] for ch in normalize(text)]


def make_batches(
    lengths: Sequence[int], max_samples: int, rng: np.random.Generator, curriculum: bool = False
) -> list[list[int]]:
    """Index batches of similar length (jittered so batches differ per epoch), shuffled."""
    jitter = np.asarray(lengths) * rng.uniform(0.9, 1.1, len(lengths))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in np.argsort(jitter):
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > max_samples:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(int(i))
        longest = longest_if_added
    if current:
        batches.append(current)
    rng.shuffle(batches)
    if curriculum:
        # SortaGrad (Deep Speech 2): short utterances first make CTC's alignments easier to find,
        # which shortens the blank-only plateau; shuffling within windows keeps batches varied.
        # Only the first CURRICULUM_SHARE of the epoch: with 32,000 clips a run's budget is about
        # one epoch, and a whole sorted epoch would keep the long clips for its very end.
        batches.sort(key=lambda b: max(lengths[i] for i in b))
        head = int(len(batches) * CURRICULUM_SHARE)
        window = 64
        for start in range(0, head, window):
            part = batches[start : min(start + window, head)]
            rng.shuffle(part)
            batches[start : start + len(part)] = part
        rest = batches[head:]
        rng.shuffle(rest)
        batches[head:] = rest
    return batches


def collate(clips: Sequence[np.ndarray], labels: Sequence[list[int]]) -> dict[str, torch.Tensor]:
    """Zero-padded normalised audio, its attention mask, and -100-padded labels."""
    n = max(len(c) for c in clips)
    audio = np.zeros((len(clips), n), np.float32)
    mask = np.zeros((len(clips), n), np.int64)
    for row, clip in enumerate(clips):
        audio[row, : len(clip)] = normalise(clip)
        mask[row, : len(clip)] = 1
    width = max(len(t) for t in labels)
    target = np.full((len(labels), width), -100, np.int64)
    for row, t in enumerate(labels):
        target[row, : len(t)] = t
    return {
        "input_values": torch.from_numpy(audio),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(target),
    }


def training_items(
    rng: np.random.Generator, renditions: int, broad_clips: int, flite: bool = False
) -> list[tuple[str, Voice]]:
    """The training clips' texts and voices: each grammar sentence `renditions` times, then
    `broad_clips` broad sentences (an equal share of each source's train list, picked by hash),
    each voice drawn from the broad pool's train voices (with flite's, if `flite`) with the
    seeded `rng`."""
    texts = [t for t in train_sentences() for _ in range(renditions)]
    for source in TRAIN_SOURCES:
        texts += pick(read_list(source, "train"), broad_clips // len(TRAIN_SOURCES), source)
    return [(t, random_broad_voice(rng, flite=flite)) for t in texts]


def monitor_clips(n: int) -> list[tuple[str, np.ndarray]]:
    """Dev sentences in train voices, for the progress line: no evaluation set is looked at."""
    rng = np.random.default_rng(0)
    items = [(t, random_broad_voice(rng)) for t in dev_split()[-n:]]
    return list(zip([t for t, _ in items], synthesize_many(items, processes=1, desc="monitor")))


def random_streaming(rng: np.random.Generator) -> Streaming:
    """Chunk and context for one streamed step, mostly the server's defaults."""
    chunk = int(rng.choice(STREAM_CHUNKS) * SAMPLE_RATE)
    return Streaming(chunk=chunk, context=int(rng.choice(STREAM_CONTEXTS) * SAMPLE_RATE))


def shift_phase(clip: np.ndarray, chunk: int, rng: np.random.Generator) -> np.ndarray:
    """Start the clip at a random point of the chunk grid (on the 20 ms frame grid), after a
    faint noise floor: live speech does not begin on a chunk boundary."""
    lead = int(rng.integers(0, chunk // 320)) * 320
    floor = rng.normal(0.0, 1e-4, lead).astype(np.float32)
    return np.concatenate([floor, clip])


def lr_at(progress: float, peak: float = PEAK_LR) -> float:
    """Linear warmup, then cosine decay to 2% of the peak."""
    if progress < WARMUP:
        return peak * progress / WARMUP
    t = min((progress - WARMUP) / (1 - WARMUP), 1.0)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    out: Path,
    minutes: float,
    seed: int,
    steps: int = STEPS,
    quick: bool = False,
    init: Path | None = None,
    peak_lr: float = PEAK_LR,
    stream_share: float = STREAM_SHARE,
    renditions: int = RENDITIONS,
    bf16: bool | None = None,
    broad_clips: int = BROAD_CLIPS,
    architecture: str = DEFAULT_ARCHITECTURE,
    threads: int = 2,
    with_lm: bool = True,
    flite: bool = False,
) -> dict[str, Any]:
    """The whole recipe; returns the run's figures (both evaluation sets, the LM's choice, the
    schedule), which metrics.json keeps too."""
    started = time.monotonic()
    bf16 = bf16_supported() if bf16 is None else bf16
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if quick:
        renditions, broad_clips = 0, 8
    items = training_items(rng, renditions, broad_clips, flite)
    # Kept as int16, as cached: 32,000 clips take 3 GB so, twice that as float32. Made in
    # parts, so that no float32 copy of the whole set is ever alive.
    clean: list[np.ndarray] = []
    for start in range(0, len(items), 2000):
        part = synthesize_many(items[start : start + 2000], 1 if quick else 2, "train audio")
        clean += [np.round(a * 32767).astype(np.int16) for a in part]
    labels = [encode(t) for t, _ in items]
    lengths = [len(a) for a in clean]
    hours = sum(lengths) / SAMPLE_RATE / 3600
    monitor = monitor_clips(4 if quick else MONITOR_CLIPS)
    tqdm.write(f"{len(items)} train clips ({hours:.2f} h clean); synthesis done")

    if init is None:
        model = Wav2Vec2ForCTC(model_config(architecture))
    else:  # a second stage from a trained folder: no curriculum, no augmentation ramp
        model = Wav2Vec2ForCTC.from_pretrained(str(init), attn_implementation="eager").float()
    # Transformers makes the raw audio require grad in training (for gradient checkpointing);
    # nothing needs d(loss)/d(audio), and computing it was 15% of a step.
    model.wav2vec2.feature_extractor._requires_grad = False
    attention = "eager"
    if not quick:
        attention, timed = fastest_attention(model, bf16)
        model.set_attn_implementation(attention)
        tqdm.write(
            "attention kernel: " + attention + " ("
            + ", ".join(f"{k} {t:.3f} s" for k, t in timed.items())
            + " per 12 s batch, forward and backward)"
        )  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "masked_spec" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "masked_spec" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    steps = 3 if quick else steps
    budget_s = minutes * 60.0
    max_samples = int((6.0 if quick else BATCH_SECONDS) * SAMPLE_RATE)
    loop_start = last_monitor = time.monotonic()
    step, epoch, progress, audio_s = 0, 0, 0.0, 0.0
    bar = tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    while progress < 1.0:
        fresh = init is None
        for batch_ids in make_batches(lengths, max_samples, rng, curriculum=fresh and epoch == 0):
            elapsed = time.monotonic() - loop_start
            progress = max(step / steps, elapsed / budget_s)
            if progress >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(progress, peak_lr)
            # Augmentation ramps in over the first AUGMENT_RAMP of progress: clean speech first
            # gets CTC off its blank-only plateau sooner, the distortions then teach robustness.
            p_aug = min(1.0, progress / AUGMENT_RAMP) if fresh else 1.0
            clips = [clean[i].astype(np.float32) / 32767.0 for i in batch_ids]
            clips = [augment(c, rng) if rng.random() < p_aug else c for c in clips]
            batch_labels = [labels[i] for i in batch_ids]
            # From scratch, CTC first learns alignments and sounds on whole utterances (cheaper:
            # a streamed step runs each second of audio twice, as chunk and as context); the
            # streamed loss (short windows, cut words) comes in for the second half.
            ramp = min(1.0, max(0.0, (progress - STREAM_FROM) / STREAM_RAMP))
            share = stream_share * (ramp if fresh else 1.0)
            # bf16 autocast: ~1.5x on CPUs with AVX512-BF16; losses stay in float32.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if rng.random() < share:
                    streaming = random_streaming(rng)
                    clips = [shift_phase(c, streaming.chunk, rng) for c in clips]
                    loss = streamed_ctc_loss(model, clips, batch_labels, streaming)
                else:
                    loss = model(**collate(clips, batch_labels)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            audio_s += sum(len(c) for c in clips) / SAMPLE_RATE
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss.item():.3f}", lr=f"{lr_at(progress, peak_lr):.2e}", ep=epoch
            )
            if not math.isfinite(float(grad)):
                tqdm.write(f"step {step}: non-finite gradient norm (skipped by clipping)")
            if time.monotonic() - last_monitor > MONITOR_EVERY_S:
                # Progress check only: nothing is selected on it, so the held-out CER stays fair.
                whole = evaluate.summarize(evaluate.per_sentence(model, monitor))
                streamed = evaluate.summarize(evaluate.per_sentence(model, monitor, Streaming()))
                tqdm.write(
                    f"step {step} ({elapsed / 60:.1f} min): monitor CER whole {whole['cer']:.1%}"
                    f" streamed {streamed['cer']:.1%}"
                )
                model.train()
                last_monitor = time.monotonic()
        epoch += 1
    bar.close()
    train_s = time.monotonic() - loop_start
    ended_by = "steps" if step >= steps else "clock"
    if ended_by == "clock" and not quick:
        # The result depends on how many steps the budget bought: the shipped model's machine
        # (AMD EPYC, AVX2 only, fp32) ran 9,559 steps in 75 min (0.47 s each; the model card).
        tqdm.write(
            f"the {minutes:g}-min clock ended the schedule at step {step} of {steps}"
            f" ({train_s / max(step, 1):.2f} s a step); the model card's run: 9,559 steps."
            " On a slower machine give it more time with --minutes."
        )

    # Saved now and again with the figures below: a failure in what follows loses no training.
    save(model, out, {"steps": step, "ended_by": ended_by, "evaluated": False})

    # The character LM for beam search (models/training/lm.py): tuned on the broad text's dev
    # split, then scored once on each evaluation set like the rest.
    lm_grid: dict[str, Any] = {}
    if quick:
        lm_grid = {"limit": 4, "orders": (3,), "alphas": (0.5,), "betas": (1.0,), "text_limit": 500}
    lm_choice = lm.build(out, model, **lm_grid) if with_lm else None
    scores = {
        name: evaluate.score_set(model, name, out, 4 if quick else None)
        for name in evaluate.EVAL_SETS
    }
    total_s = time.monotonic() - started
    stats = {
        **scores, "stream_share": stream_share, "renditions": renditions,
        "broad_clips": broad_clips, "flite": flite, "architecture": architecture, "bf16": bf16,
        "attention": attention, "params": params, "steps": step, "ended_by": ended_by,
        "epochs": epoch, "train_clips": len(items),
        "train_hours": round(hours, 3), "audio_seen_hours": round(audio_s / 3600, 2),
        "train_loop_min": round(train_s / 60, 1), "total_min": round(total_s / 60, 1),
        "seed": seed, "minutes": minutes, "init": str(init) if init else None,
        "lm": lm_choice,
    }  # fmt: skip
    save(model, out, stats)
    tqdm.write(json.dumps(stats))
    return stats


def save(model: Wav2Vec2ForCTC, out: Path, stats: dict[str, Any]) -> None:
    """config.json + model.safetensors (float32), vocab.json, metrics.json (README by hand)."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "vocab.json").write_text(json.dumps(TOKEN_IDS, indent=1) + "\n")
    metrics = {"run": stats}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--minutes", type=float, default=75.0, help="training-loop time budget")
    parser.add_argument("--steps", type=int, default=STEPS, help="nominal schedule length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps on a few sentences")
    parser.add_argument("--init", type=Path, help="continue from this trained model folder")
    parser.add_argument("--lr", type=float, default=PEAK_LR, help="peak learning rate")
    parser.add_argument(
        "--stream-share", type=float, default=STREAM_SHARE, help="share of streamed-loss steps"
    )
    parser.add_argument(
        "--renditions", type=int, default=RENDITIONS, help="train voices per grammar sentence"
    )
    parser.add_argument(
        "--broad-clips", type=int, default=BROAD_CLIPS, help="broad-text sentences, one voice each"
    )
    parser.add_argument(
        "--arch", default=DEFAULT_ARCHITECTURE, choices=list(ARCHITECTURES), help="model size"
    )
    parser.add_argument(
        "--flite", action="store_true", help="flite's recorded speakers among the train voices"
    )
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument(
        "--no-lm", action="store_true", help="no character LM (comparing acoustic models)"
    )
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="no bf16 autocast (default: on where the CPU has AVX512-BF16 or AMX)",
    )
    args = parser.parse_args(argv)
    stats = train(
        args.out, args.minutes, args.seed, args.steps, args.quick, args.init, args.lr,
        args.stream_share, args.renditions, False if args.fp32 else None, args.broad_clips,
        args.arch, args.threads, not args.no_lm, args.flite,
    )  # fmt: skip
    for name in evaluate.EVAL_SETS:
        print(f"{name}: " + evaluate.describe_scores(stats[name]))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
