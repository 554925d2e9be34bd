"""The training recipe: text, metrics, synthesis (espeak-ng and festival), voice split, the
evaluation sets, and a --quick run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.char_lm import find_language_model
from models.presets import BASE_960H_VOCAB
from models.training import corpus, evaluate, synth

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")


def test_normalize_keeps_letters_apostrophe_and_single_spaces() -> None:
    assert corpus.normalize("  Don’t  stop, it's 5 o'clock!\n") == "DON'T STOP IT'S O'CLOCK"
    assert corpus.normalize("a-b\tc") == "A B C"
    assert corpus.normalize("...") == ""


def test_number_words() -> None:
    assert corpus.number_words(0) == "zero"
    assert corpus.number_words(42) == "forty two"
    assert corpus.number_words(300) == "three hundred"
    assert corpus.number_words(1917) == "one thousand nine hundred seventeen"


def test_cer_and_wer_known_cases() -> None:
    assert evaluate.cer("ABC", "ABC") == 0.0
    assert evaluate.cer("ABC", "AXC") == pytest.approx(1 / 3)
    assert evaluate.cer("ABC", "") == 1.0
    assert evaluate.cer("AB", "ABCD") == 1.0  # two insertions over two reference characters
    assert evaluate.cer("KITTEN", "SITTING") == pytest.approx(3 / 6)
    assert evaluate.wer("THE CAT SAT", "THE BAT SAT DOWN") == pytest.approx(2 / 3)
    results = [
        evaluate.Utterance("AB", "AB", 0.0, 0.0),
        evaluate.Utterance("ABCDEFGH", "ABCDEFGX", 1 / 8, 1.0),
    ]
    # Corpus CER is total edits over total reference characters, not a mean of ratios.
    assert evaluate.summarize(results)["cer"] == pytest.approx(1 / 10)


def test_ctc_greedy_collapses_repeats_and_blanks() -> None:
    ids = {t: i for i, t in enumerate(BASE_960H_VOCAB)}
    seq = [0, ids["H"], ids["H"], ids["I"], 0, ids["|"], ids["|"], ids["A"], 0, ids["A"], 0]
    assert evaluate.ctc_greedy(seq) == "HI AA"


def test_sentence_lists_are_disjoint_varied_and_regenerable() -> None:
    train, heldout = corpus.train_sentences(), corpus.heldout_sentences()
    assert len(train) >= 2000 and 100 <= len(heldout) <= 200
    assert not set(train) & set(heldout)
    letters = set("".join(train))
    assert letters >= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
    assert all(s == corpus.normalize(s) for s in train + heldout)
    # The committed files are exactly what the grammar writes (deterministic).
    assert corpus.generate() == (train, heldout)


def test_voice_sets_are_disjoint_and_exist() -> None:
    assert not set(synth.TRAIN_VOICES) & set(synth.HELDOUT_VOICES)
    assert not set(synth.TRAIN_VARIANTS) & set(synth.HELDOUT_VARIANTS)
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = synth.random_voice(rng, heldout=True)
        assert v.base in synth.HELDOUT_VOICES and v.variant in synth.HELDOUT_VARIANTS
    # espeak-ng silently falls back to its default for an unknown variant: check the files.
    data = Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v")
    if data.is_dir():
        names = {p.name for p in data.iterdir()}
        for v in synth.TRAIN_VARIANTS + synth.HELDOUT_VARIANTS:
            assert v == "" or v in names, v


def test_curriculum_puts_the_shortest_fifth_first_then_shuffles() -> None:
    from models.training.train import CURRICULUM_SHARE, make_batches

    rng = np.random.default_rng(3)
    lengths = [int(x) for x in rng.integers(16_000, 160_000, 4000)]
    batches = make_batches(lengths, 12 * 16_000, np.random.default_rng(0), curriculum=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    longest = [max(lengths[i] for i in b) for b in batches]
    head = int(len(batches) * CURRICULUM_SHARE)
    assert max(longest[:head]) <= min(longest[head:])  # the head: the shortest batches
    rest = longest[head:]
    assert rest != sorted(rest)  # the rest of the epoch is shuffled
    plain = make_batches(lengths, 12 * 16_000, np.random.default_rng(0))
    assert sorted(map(len, plain)) == sorted(map(len, batches))


def test_broad_voice_pool_holds_out_whole_voices() -> None:
    assert not set(synth.FESTIVAL_TRAIN_VOICES) & set(synth.FESTIVAL_HELDOUT_VOICES)
    rng = np.random.default_rng(1)
    train = [synth.random_broad_voice(rng) for _ in range(400)]
    with_flite = [synth.random_broad_voice(rng, flite=True) for _ in range(400)]
    heldout = [synth.random_broad_voice(rng, heldout=True) for _ in range(400)]
    assert {v.engine for v in train} == {v.engine for v in heldout} == {"espeak", "festival"}
    assert {v.engine for v in with_flite} == {"espeak", "festival", "flite"}
    assert not {v.name for v in train + with_flite} & {v.name for v in heldout}
    # flite changes the train draws only: the unseen set's voices stay what they were.
    a, b = np.random.default_rng(2), np.random.default_rng(2)
    assert [synth.random_broad_voice(a, heldout=True) for _ in range(50)] == [
        synth.random_broad_voice(b, heldout=True, flite=True) for _ in range(50)
    ]
    for v in heldout:
        if v.engine == "festival":
            assert v.base in synth.FESTIVAL_HELDOUT_VOICES
        else:
            assert v.base in synth.HELDOUT_VOICES and v.variant in synth.HELDOUT_VARIANTS


def test_festival_voices_speak_in_batches_as_alone() -> None:
    texts = ["THE OCEANS ARE TEEMING WITH LIFE", "SHE SIGHED SADLY"]
    for name in synth.FESTIVAL_TRAIN_VOICES + synth.FESTIVAL_HELDOUT_VOICES:
        voice = synth.Voice(name, "", 175, 50, synth.FESTIVAL)
        together = synth.synthesize_festival(texts, voice)
        alone = [synth.synthesize(t, voice) for t in texts]
        for a, b in zip(together, alone):
            assert a.dtype == np.float32 and np.array_equal(a, b)
        assert 1.2 < len(together[0]) / synth.SAMPLE_RATE < 4.0
        assert len(together[1]) < len(together[0])
        assert 0.01 < float(np.sqrt(np.mean(together[0] ** 2))) < 0.5
    # A diphone voice takes the speed as a duration stretch.
    slow = synth.synthesize(texts[0], synth.Voice("kal_diphone", "", 120, 50, synth.FESTIVAL))
    fast = synth.synthesize(texts[0], synth.Voice("kal_diphone", "", 220, 50, synth.FESTIVAL))
    assert len(slow) > 1.3 * len(fast)


def test_flite_voices_speak_at_the_asked_speed() -> None:
    text = "THE OCEANS ARE TEEMING WITH LIFE"
    spectra = []
    for name in synth.FLITE_TRAIN_VOICES:
        audio = synth.synthesize(text, synth.Voice(name, "", 175, 50, synth.FLITE))
        assert audio.dtype == np.float32 and 1.2 < len(audio) / synth.SAMPLE_RATE < 4.0
        assert 0.01 < float(np.sqrt(np.mean(audio**2))) < 0.5
        frames = np.lib.stride_tricks.sliding_window_view(audio, 512)[::256]
        spectra.append(np.log(np.abs(np.fft.rfft(frames * np.hanning(512))) + 1e-4).mean(0))
    slow = synth.synthesize(text, synth.Voice("rms", "", 120, 50, synth.FLITE))
    fast = synth.synthesize(text, synth.Voice("rms", "", 220, 50, synth.FLITE))
    assert len(slow) > 1.3 * len(fast)
    # Three speakers, not one: their spectra differ (mean log-magnitude per band).
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(spectra[i] - spectra[j]).mean() > 0.2


def test_unseen_set_is_the_eval_source_in_heldout_voices_and_deterministic() -> None:
    from models.training.sources import eval_sentences

    first = evaluate.eval_clips("unseen", limit=6)
    second = evaluate.eval_clips("unseen", limit=6)
    assert [t for t, _ in first] == eval_sentences()[:6]
    for (_, a), (_, b) in zip(first, second):
        assert np.array_equal(a, b) and a.dtype == np.float32 and len(a) > synth.SAMPLE_RATE
    with pytest.raises(ValueError, match="no evaluation set"):
        evaluate.eval_clips("training")


def test_synthesis_is_16k_plausible_and_deterministic() -> None:
    voice = synth.Voice("en-us", "m3", 170, 50)
    text = "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG"
    a = synth.synthesize(text, voice)
    assert a.dtype == np.float32 and a.ndim == 1
    seconds = len(a) / synth.SAMPLE_RATE
    assert 1.5 < seconds < 6.0  # nine words at 170 words per minute, plus espeak's pauses
    assert 0.01 < float(np.sqrt(np.mean(a**2))) < 0.5
    assert np.array_equal(a, synth.synthesize(text, voice))
    slow = synth.synthesize(text, synth.Voice("en-us", "m3", 120, 50))
    assert len(slow) > len(a)
    # Augmentation is a pure function of the audio and the generator's seed.
    x = synth.augment(a, np.random.default_rng(7))
    y = synth.augment(a, np.random.default_rng(7))
    assert np.array_equal(x, y) and x.dtype == np.float32 and np.abs(x).max() <= 1.0
    assert len(x) >= len(a)


def test_heldout_clips_are_deterministic() -> None:
    first = evaluate.heldout_clips(limit=3)
    second = evaluate.heldout_clips(limit=3)
    assert [t for t, _ in first] == corpus.heldout_sentences()[:3]
    for (_, a), (_, b) in zip(first, second):
        assert np.array_equal(a, b) and a.dtype == np.float32


def test_quick_training_writes_a_loadable_model(tmp_path: Path) -> None:
    from models.presets import resolve_model
    from models.training import train
    from models.wav2vec2_checkpoint import load_torch_model

    out = tmp_path / "model"
    assert train.main(["--out", str(out), "--quick", "--seed", "0"]) == 0
    # three nominal steps end the quick schedule, not its clock
    run = json.loads((out / "metrics.json").read_text())["run"]
    assert run["ended_by"] == "steps"
    for name in ("config.json", "model.safetensors", "vocab.json"):
        assert (out / name).is_file()
    vocab = json.loads((out / "vocab.json").read_text())
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == list(BASE_960H_VOCAB)
    config = json.loads((out / "config.json").read_text())
    assert config["conv_kernel"] == [10, 3, 3, 3, 3, 2, 2]
    assert config["conv_stride"] == [5, 2, 2, 2, 2, 2, 2]
    assert config["vocab_size"] == 32 and config["feat_extract_norm"] == "layer"
    model = evaluate.load_model(out)
    assert isinstance(evaluate.transcribe(model, np.zeros(16000, np.float32)), str)
    loaded = load_torch_model(resolve_model(str(out)))  # the server's own loader
    assert loaded.vocab == list(BASE_960H_VOCAB) and loaded.blank_id == 0
    # The character LM, tuned on dev sentences, and the held-out figures with it.
    found = find_language_model(out)
    assert found is not None and found.lm.order == 3 and (found.alpha, found.beta) == (0.5, 1.0)
    # Both evaluation sets, greedy and with the LM, whole and streamed.
    for name in evaluate.EVAL_SETS:
        for decoding in ("greedy", "lm"):
            for path in ("whole", "streamed"):
                assert run[name][decoding][path]["sentences"] == 4
                assert 0 <= run[name][decoding][path]["cer"]
    assert run["lm"]["order"] == 3 and 0 <= run["lm"]["whole"]


def test_attention_kernel_is_chosen_by_timing_a_copy() -> None:
    import torch
    from transformers import Wav2Vec2ForCTC

    from models.training.train import fastest_attention, model_config

    model = Wav2Vec2ForCTC(model_config())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kernel, timed = fastest_attention(model, bf16=False, repeats=1)
    assert set(timed) == {"eager", "sdpa"} and all(t > 0 for t in timed.values())
    assert kernel == min(timed, key=lambda k: timed[k])
    # The probe ran on a copy: the model's weights, gradients and kernel are as they were.
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert model.config._attn_implementation == "eager"
