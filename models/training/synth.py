"""espeak-ng speech at 16 kHz, the train / held-out voice split, a disk cache, and augmentation.

Voices: a "voice" here is an espeak-ng base voice (accent) plus a variant (timbre: formants,
pitch range, breathiness), spoken at some speed (words per minute) and pitch (0-99). The held-out
evaluation uses base voices AND variants that training never hears, so its CER measures
generalisation to unseen speakers, not memorised ones:

- train base voices: en-us, en-us-nyc, en-gb, en-gb-x-rp, en-gb-x-gbclan, en-029
- held-out base voices: en-gb-scotland (rhotic), en-gb-x-gbcwmd (West Midlands, drops its h's)
- variants: HELDOUT_VARIANTS below are held out; whispers, robots and novelty voices are unused.

Festival voices (Debian `festival` and `festvox-*`; `engine="festival"`) bring other ways of
making speech: two diphone voices recorded from American men (kal, ked) and an HTS voice trained
on a recorded American woman (CMU ARCTIC slt). `ked_diphone` is held out. Flite's clustergen
voices (Debian `flite`; `engine="flite"`), each trained on a recorded CMU ARCTIC speaker (awb, a
Scottish man; rms, an American man; slt), join the train voices with `flite=True` (the
recipe's `--flite`): in one 75-minute run they moved the unseen set by under a point (its
held-out diphone voice from 56.7% to 54.3% greedy CER, the grammar set 0.8 points the other way;
BENCHMARKS.md, "The offline model's voices"), so the default pool stays festival's and
espeak-ng's. MBROLA voices (espeak-ng's mb-*) need Debian's non-free `mbrola-*` packages,
which this project's package sources do not reach: they are not used.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile
import soxr
from tqdm import tqdm

from models.base import ANALYSIS_SAMPLE_RATE

SAMPLE_RATE = ANALYSIS_SAMPLE_RATE  # the clips are what the analyser hears
ESPEAK = "espeak-ng"
FESTIVAL = "festival"
FLITE = "flite"
CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "training" / "clips"

TRAIN_VOICES = ("en-us", "en-us-nyc", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-029")
HELDOUT_VOICES = ("en-gb-scotland", "en-gb-x-gbcwmd")
# "" is the base voice's own timbre.
TRAIN_VARIANTS = (
    "", "m1", "m2", "m3", "m5", "m6", "m7", "m8", "f1", "f2", "f4", "f5", "klatt", "klatt2",
    "klatt4", "klatt5", "klatt6", "adam", "Alex", "Alicia", "Andy", "Annie", "antonio", "aunty",
    "benjamin", "boris", "caleb", "croak", "Denis", "Diogo", "ed", "edward", "edward2", "Gene",
    "Gene2", "grandma", "grandpa", "gustave", "Henrique", "Hugo", "iven", "iven2", "iven4",
    "Jacky", "john", "kaukovalta", "Lee", "linda", "marcelo", "Marco", "Mario", "max", "Michael",
    "michel", "miguel", "Mike", "Nguyen", "pablo", "paul", "pedro", "quincy", "robert", "sandro",
    "shelby", "steph", "steph3", "travis", "victor", "zac", "anika",
)  # fmt: skip
HELDOUT_VARIANTS = (
    "m4", "f3", "klatt3", "belinda", "david", "steph2", "iven3", "Andrea", "norbert", "rob",
)  # fmt: skip
TRAIN_SPEEDS = (120, 220)  # words per minute, sampled uniformly
HELDOUT_SPEEDS = (130, 200)
TRAIN_PITCHES = (30, 70)
HELDOUT_PITCHES = (35, 65)


FESTIVAL_TRAIN_VOICES = ("kal_diphone", "cmu_us_slt_arctic_hts")
FESTIVAL_HELDOUT_VOICES = ("ked_diphone",)
FLITE_TRAIN_VOICES = ("awb", "rms", "slt")
FESTIVAL_SHARE = 0.25  # of the broad voice pool's draws: festival's, the rest espeak-ng's
RECORDED_SHARE = 0.4  # with flite: of the train draws, festival's and flite's voices together
ESPEAK_SPEED = 175  # espeak-ng's default wpm: festival at `speed` is stretched by this / speed
FESTIVAL_BATCH = 32  # utterances per festival process: it starts in ~0.3 s, speaks one in ~0.15


@dataclass(frozen=True)
class Voice:
    """One speaker: base voice, variant ("" for none), speed in wpm, pitch 0-99 (espeak-ng's;
    a festival voice takes the speed as a duration stretch, where it can, and keeps its pitch)."""

    base: str
    variant: str
    speed: int
    pitch: int
    engine: str = "espeak"

    @property
    def name(self) -> str:
        if self.engine in (FESTIVAL, FLITE):
            return f"{self.engine}:{self.base}"
        return self.base + (f"+{self.variant}" if self.variant else "")


def random_voice(rng: np.random.Generator, heldout: bool = False) -> Voice:
    """A voice drawn from the train (or held-out) lists, speed and pitch ranges."""
    bases, variants = (
        (HELDOUT_VOICES, HELDOUT_VARIANTS) if heldout else (TRAIN_VOICES, TRAIN_VARIANTS)
    )
    speeds, pitches = (
        (HELDOUT_SPEEDS, HELDOUT_PITCHES) if heldout else (TRAIN_SPEEDS, TRAIN_PITCHES)
    )
    return Voice(
        base=str(rng.choice(bases)),
        variant=str(rng.choice(variants)),
        speed=int(rng.integers(speeds[0], speeds[1] + 1)),
        pitch=int(rng.integers(pitches[0], pitches[1] + 1)),
    )


def random_broad_voice(
    rng: np.random.Generator, heldout: bool = False, flite: bool = False
) -> Voice:
    """A voice from the broad pool: festival's (FESTIVAL_SHARE of the draws) or espeak-ng's,
    train or held-out; a held-out draw never gives a voice that training hears. `flite` adds
    flite's recorded speakers to the train draws (RECORDED_SHARE of them go to festival's and
    flite's voices together); held-out draws are the same either way."""
    recorded_share = RECORDED_SHARE if flite and not heldout else FESTIVAL_SHARE
    if rng.random() >= recorded_share:
        return random_voice(rng, heldout)
    speeds = HELDOUT_SPEEDS if heldout else TRAIN_SPEEDS
    speed = int(rng.integers(speeds[0], speeds[1] + 1))
    names = [(FESTIVAL, n) for n in (FESTIVAL_HELDOUT_VOICES if heldout else FESTIVAL_TRAIN_VOICES)]
    if flite and not heldout:
        names += [(FLITE, n) for n in FLITE_TRAIN_VOICES]
    engine, name = names[int(rng.integers(len(names)))]  # the draw rng.choice(names) would make
    return Voice(name, "", speed, 50, engine)


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """Speak `text`; float32 mono at 16 kHz."""
    if voice.engine == FESTIVAL:
        return synthesize_festival([text], voice)[0]
    return _speak_one(text, voice)


def _speak_one(text: str, voice: Voice) -> np.ndarray:
    """One utterance by a voice whose engine starts in milliseconds (espeak-ng, flite)."""
    return _flite(text, voice) if voice.engine == FLITE else _espeak(text, voice)


def _espeak(text: str, voice: Voice) -> np.ndarray:
    """espeak-ng's speech (its own rate is 22.05 kHz)."""
    cmd = [ESPEAK, "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout"]
    wav = subprocess.run(cmd + [text.lower()], capture_output=True, check=True).stdout
    # With --stdout espeak cannot seek back to fill in the sizes, so its header claims ~2 GB of
    # data; read the header for the rate and take everything after the "data" chunk as samples.
    rate = struct.unpack("<I", wav[24:28])[0]  # the fmt chunk's sample rate
    start = wav.index(b"data") + 8
    pcm = np.frombuffer(wav[start : start + (len(wav) - start) // 2 * 2], dtype="<i2")
    audio = pcm.astype(np.float32) / 32768.0
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)


def _duration_stretch(voice: Voice) -> float:
    """The drawn speed as festival's and flite's duration stretch (against espeak-ng's default
    rate), kept within what their voices say clearly."""
    return min(max(ESPEAK_SPEED / voice.speed, 0.75), 1.35)


def _flite(text: str, voice: Voice) -> np.ndarray:
    """flite's speech (16 kHz already). Its clustergen voices take the speed as a duration
    stretch, like festival's diphone voices; they ignore a pitch target, so pitch varies only
    through augmentation."""
    with tempfile.TemporaryDirectory(prefix="grym-flite-") as tmp:
        path = Path(tmp) / "speech.wav"
        stretch = f"duration_stretch={_duration_stretch(voice):.3f}"
        cmd = [FLITE, "-voice", voice.base, "--setf", stretch]
        subprocess.run(cmd + ["-t", text.lower(), "-o", str(path)], capture_output=True, check=True)
        audio, rate = soundfile.read(path, dtype="float32")
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)


def synthesize_festival(texts: Sequence[str], voice: Voice) -> list[np.ndarray]:
    """Speak each text with one festival process (the voice loads once); float32 16 kHz mono.

    The HTS voice ignores the duration stretch: its speed varies only through augmentation."""
    stretch = _duration_stretch(voice)
    with tempfile.TemporaryDirectory(prefix="grym-festival-") as tmp:
        lines = [f"(voice_{voice.base})", f"(Parameter.set 'Duration_Stretch {stretch:.3f})"]
        for i, text in enumerate(texts):
            # Normalised text holds only letters, apostrophes and spaces: safe in the string.
            utterance = f'(utt.synth (Utterance Text "{text.lower()}"))'
            lines.append(f'(utt.save.wave {utterance} "{tmp}/{i}.wav" \'riff)')
        script = Path(tmp) / "speak.scm"
        script.write_text("\n".join(lines) + "\n")
        done = subprocess.run([FESTIVAL, "-b", str(script)], capture_output=True, text=True)
        out = []
        for i in range(len(texts)):
            path = Path(tmp) / f"{i}.wav"
            if not path.is_file():
                raise RuntimeError(f"festival ({voice.base}) said nothing: {done.stderr[-400:]}")
            audio, rate = soundfile.read(path, dtype="float32")
            out.append(soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32))
        return out


def cache_path(text: str, voice: Voice) -> Path:
    key = hashlib.sha1(f"{voice.name}|{voice.speed}|{voice.pitch}|{text}".encode()).hexdigest()
    return CACHE_DIR / key[:2] / f"{key}.npy"


def synthesize_cached(text: str, voice: Voice) -> np.ndarray:
    """`synthesize`, kept on disk as int16 under .cache/training so that re-runs skip it."""
    return _cached([text], voice)[0]


def _cached(texts: Sequence[str], voice: Voice) -> list[np.ndarray]:
    """Each text in `voice` from the disk cache; the missing ones synthesised (festival's in one
    process) and stored. What is returned is what the cache holds, so that a first and a later
    call agree."""
    paths = [cache_path(text, voice) for text in texts]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    if voice.engine == FESTIVAL and missing:
        made = dict(zip(missing, synthesize_festival([texts[i] for i in missing], voice)))
    else:
        made = {i: _speak_one(texts[i], voice) for i in missing}
    for i, audio in made.items():
        _store(paths[i], audio)
    return [np.load(path).astype(np.float32) / 32767.0 for path in paths]


def _store(path: Path, audio: np.ndarray) -> None:
    pcm = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{np.random.randint(1 << 30)}.tmp.npy")
    np.save(tmp, pcm)
    tmp.replace(path)  # atomic, so a parallel writer or an interrupted run leaves no torn file


Group = tuple[Voice, list[int], list[str]]  # a voice, the items' places, their texts


def _job(group: Group) -> tuple[list[int], list[np.ndarray]]:
    voice, where, texts = group
    return where, _cached(texts, voice)


def synthesize_many(
    items: Sequence[tuple[str, Voice]], processes: int = 2, desc: str = "synthesis"
) -> list[np.ndarray]:
    """Cached synthesis of many (text, voice) pairs on a small process pool, in order.

    A festival voice's items go in groups of FESTIVAL_BATCH to one process each (its start-up
    and voice loading would otherwise cost more than its speech); espeak-ng's one at a time.
    """
    by_voice: dict[Voice, list[int]] = {}
    for i, (_, voice) in enumerate(items):
        by_voice.setdefault(voice, []).append(i)
    groups: list[Group] = []
    for voice, where in by_voice.items():
        size = FESTIVAL_BATCH if voice.engine == FESTIVAL else 1
        for start in range(0, len(where), size):
            part = where[start : start + size]
            groups.append((voice, part, [items[i][0] for i in part]))
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(items)
    pool = Pool(processes) if processes > 1 and len(items) >= 16 else None
    done = map(_job, groups) if pool is None else pool.imap_unordered(_job, groups, chunksize=4)
    with tqdm(total=len(items), desc=desc, leave=False) as bar:
        for where, audio in done:
            for i, clip in zip(where, audio):
                out[i] = clip
            bar.update(len(where))
    if pool is not None:
        pool.close()
        pool.join()
    return out


# --- augmentation -------------------------------------------------------------------------------
def _room(rng: np.random.Generator) -> np.ndarray:
    """A reverb-like impulse response: a direct path plus exponentially decaying noise."""
    rt60 = rng.uniform(0.05, 0.5)  # seconds for the tail to fall by 60 dB
    n = int(SAMPLE_RATE * min(rt60, 0.3))
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60) * rng.uniform(0.05, 0.4)
    tail[0] = 1.0
    return tail.astype(np.float32)


def _fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: len(x)]
    return y.astype(np.float32)


def augment(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random, label-preserving distortion of clean 16 kHz speech (float32 in, float32 out).

    Each effect is applied with some probability so that clean speech is still seen: a speed
    perturbation (played 10% faster or slower: pitch and formants move together, as between
    speakers with longer or shorter vocal tracts), silence padding (the server hears pauses), a
    resampling round trip (band limits of 8-48 kHz pipelines), a tilt filter and reverb
    (microphones and rooms), gain, then noise at an SNR.
    """
    x = audio.astype(np.float32)
    if rng.random() < 0.3:
        factor = rng.uniform(0.9, 1.1)  # > 1: slower and lower
        x = soxr.resample(x, SAMPLE_RATE, int(SAMPLE_RATE * factor), "LQ").astype(np.float32)
    pad = rng.integers(0, int(0.3 * SAMPLE_RATE), size=2)
    x = np.concatenate([np.zeros(pad[0], np.float32), x, np.zeros(pad[1], np.float32)])
    if rng.random() < 0.4:
        rate = int(rng.integers(8_000, 48_001))
        x = soxr.resample(soxr.resample(x, SAMPLE_RATE, rate, "LQ"), rate, SAMPLE_RATE, "LQ")
    if rng.random() < 0.4:  # first-order tilt: a<0 brightens, a>0 muffles
        a = rng.uniform(-0.9, 0.9)
        x = (x + a * np.concatenate([[0.0], x[:-1]])).astype(np.float32)
    if rng.random() < 0.3:
        x = _fft_convolve(x, _room(rng))
    peak = float(np.abs(x).max()) or 1.0
    x = x / peak * (10 ** (rng.uniform(-30, 0) / 20))
    if rng.random() < 0.6:
        snr_db = rng.uniform(5, 40)
        noise = rng.standard_normal(len(x)).astype(np.float32)
        if rng.random() < 0.5:  # brownish noise: more low-frequency rumble than hiss
            noise = np.cumsum(noise).astype(np.float32)
            noise -= np.linspace(noise[0], noise[-1], len(noise), dtype=np.float32)
        signal_power = float(np.mean(x**2)) + 1e-12
        noise *= np.sqrt(signal_power / (float(np.mean(noise**2)) + 1e-12) / 10 ** (snr_db / 10))
        x = x + noise
    return np.clip(x, -1.0, 1.0).astype(np.float32)
