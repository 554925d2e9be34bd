"""AudioLDM text-to-audio and audio variation: one readable pipeline on maintained components.

diffusers' own AudioLDMPipeline is deprecated (no fixes after 0.33.1), so the loop lives here, in
its style, built on the components that are maintained: UNet2DConditionModel, AutoencoderKL and
the schedulers from diffusers, the CLAP text encoder and the SpeechT5 HiFi-GAN vocoder from
transformers. Owning it gives step callbacks, cancellation between steps and the cost cuts:

  1. encode the prompt and the negative prompt with CLAP (cached per prompt: live sessions repeat
     their prompts);
  2. prepare latents: seeded noise, or for a variation the source audio's latent noised to
     `strength` (SDEdit; AudioLDM's own style transfer);
  3. denoise with classifier-free guidance, both halves in one batched UNet call per step,
     calling back after each step and stopping at the next step once cancelled (the UNet calls:
     models/audioldm_unet.py, with the opt-in approximations);
  4. decode the latents to a log-mel spectrogram with the VAE (opt-in: the first rows first, so
     that the first audio need not wait for the whole decode);
  5. vocode the mel in overlapping blocks and yield each as soon as it is ready: HiFi-GAN is
     convolutional, so a block decoded with enough mel on both sides equals that stretch of the
     whole clip, and the first audio goes out long before the last is made.

bf16 autocast runs the networks where the CPU supports it (1.7-1.9x on AVX512-BF16); on a CUDA
device (the Ray generation replicas given a GPU) they run under fp16 autocast. On the CPU the VAE
runs channels-last (oneDNN's native layout for its convolutions: 2x), and the UNet and vocoder
run compiled ahead of time where packages for the clip's shapes exist (models/audioldm_compiled.py:
a UNet step 2x, a vocoder block 1.3x).
The scheduler's arithmetic stays in float32, and the seeded noise is drawn on the CPU, so a seed
makes the same clip on either device (up to the precision). Plain synchronous code: the engine
runs it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from models.audioldm_compiled import CompiledNetworks, Shape
from models.audioldm_components import AudioLDMComponents, make_scheduler
from models.audioldm_unet import UNetSteps
from models.generation import (
    MEL_HOP,
    SAMPLE_RATE,
    AudioBlock,
    Callbacks,
    Continuation,
    GenerationCancelled,
    GenerationRequest,
    SegmentPlan,
    crossfade,
)

# Mel frames of context decoded around each block: with 16, a block of the AudioLDM-S HiFi-GAN
# equals that stretch of whole-clip vocoding to 3e-7 (relative); with 8, only to 3e-4.
VOCODER_PAD = 16
TEXT_CACHE = 64  # prompts whose CLAP embeddings are kept
FIRST_BLOCK = 25  # mel frames of the first vocoder block (0.25 s): see _blocks
# progressive_vae: the latent rows decoded first (those the first vocoder block and its context
# need: 44 >= 25 + VOCODER_PAD frames), with this many more after them. The VAE's GroupNorms
# take statistics over the whole input, so a part decodes a little differently from the whole:
# on AudioLDM-S (random weights) the first 7-13 rows' mel is 2.1-3.4% (relative L2) from the
# whole clip's, against 8% with 4 rows of context; the rest is the whole decode's, exactly.
VAE_FIRST_ROWS = 11
VAE_CONTEXT_ROWS = 16


class AudioLDM:
    def __init__(
        self, components: AudioLDMComponents, bf16: bool | None = None, device: str = "cpu"
    ) -> None:
        self.c = components
        self.device = torch.device(device)
        if self.device.type != "cpu":
            for network in (components.text_encoder, components.unet, components.vae,
                            components.vocoder):  # fmt: skip
                network.to(self.device)
        self.vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.mel_bins = components.vocoder.config.model_in_dim
        on_cpu = self.device.type == "cpu"
        self.bf16 = on_cpu and (_bf16_supported() if bf16 is None else bf16)
        self._layout = torch.channels_last if on_cpu else torch.contiguous_format
        components.vae.to(memory_format=self._layout)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.compiled: CompiledNetworks | None = None  # set by the loader where packages exist

    @torch.no_grad()
    def generate(
        self, request: GenerationRequest, callbacks: Callbacks | None = None
    ) -> Iterator[AudioBlock]:
        """The clip (or a continuous stream's segment) as blocks of audio, the first as early as
        possible; raises GenerationCancelled at the first step or block boundary after
        `callbacks.cancelled()`."""
        callbacks = callbacks or Callbacks()
        started = time.perf_counter()
        timings: dict[str, Any] = {"unet_steps": []}
        plan = SegmentPlan.of(request, self.vae_scale) if request.hop_seconds else None
        frames = clip_frames(request.seconds, self.vae_scale) if plan is None else plan.frames

        # 1. Encode the prompts: [negative, positive] for one batched guidance call.
        t0 = time.perf_counter()
        guided = request.guidance > 1.0
        texts = [request.negative_prompt, request.prompt] if guided else [request.prompt]
        embeds = torch.cat([self.text_embedding(text) for text in texts])
        timings["text_s"] = time.perf_counter() - t0

        # 2. Latents: noise from the seed, or the source's latent noised to `strength`; a
        #    segment that continues a stream keeps the rows it shares with the one before.
        scheduler = make_scheduler(self.c.scheduler_config, request.scheduler)
        scheduler.set_timesteps(request.steps, device=self.device)
        timesteps = scheduler.timesteps
        generator = torch.Generator().manual_seed(request.seed)
        channels = self.c.unet.config.in_channels
        shape = (1, channels, frames // self.vae_scale, self.mel_bins // self.vae_scale)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        known = None
        if request.continuation is not None:
            known = torch.from_numpy(request.continuation.latents)[None].to(self.device)
        if request.source is None:
            latents = noise * scheduler.init_noise_sigma
            if known is not None:
                latents = _inpaint(latents, known, noise, scheduler, timesteps[:1])
        else:
            t0 = time.perf_counter()
            latents = self.encode_audio(request.source, frames)
            kept = round(request.steps * request.strength)
            timesteps = timesteps[len(timesteps) - kept * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index((request.steps - kept) * scheduler.order)
            if kept:
                latents = scheduler.add_noise(latents, noise, timesteps[:1])
            timings["encode_s"] = time.perf_counter() - t0

        # 3. Denoise, calling back after each step and stopping once cancelled. Rows a segment
        #    continues are put back after each step, noised to the next step's level (exactly
        #    themselves after the last): the rest is denoised to fit them (inpainting).
        unet = UNetSteps(
            self.c.unet, lambda batch: self._compiled(Shape("unet", batch, shape[2])),
            self._autocast, request.deep_cache_interval,
        )  # fmt: skip
        guided_steps = round(len(timesteps) * request.guidance_until) if guided else 0
        for i, t in enumerate(timesteps):
            if callbacks.cancelled():
                raise GenerationCancelled
            t0 = time.perf_counter()
            guide = i < guided_steps  # guidance may stop early (an opt-in approximation)
            model_input = torch.cat([latents] * 2) if guide else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = unet(model_input, t, embeds if guide else embeds[-1:], i)
            if guide:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + request.guidance * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
            if known is not None:
                latents = _inpaint(latents, known, noise, scheduler, timesteps[i + 1 : i + 2])
            timings["unet_steps"].append(time.perf_counter() - t0)
            callbacks.on_step(i + 1, len(timesteps))
        denoised = time.perf_counter()
        timings["unet"] = _share(unet.compiled_calls, unet.calls)

        # 4. Latents -> log-mel spectrogram (frames, mel bins): the whole clip's; or, with
        #    `progressive_vae`, first only the rows the first vocoder block needs (decoded with
        #    VAE_CONTEXT_ROWS more after them), the whole clip once that block's audio is out.
        if callbacks.cancelled():
            raise GenerationCancelled
        t0 = time.perf_counter()
        first_rows = VAE_FIRST_ROWS + VAE_CONTEXT_ROWS
        progressive = request.progressive_vae and plan is None and latents.shape[2] > first_rows
        if progressive:
            mel = self._decode(latents[:, :, :first_rows])[: VAE_FIRST_ROWS * self.vae_scale]
        else:
            mel = self._decode(latents)
        timings["vae_s"] = time.perf_counter() - t0

        # 5. Vocode block by block; the first block is short so that audio starts early. A clip
        #    is cut to its length; a segment emits its share (SegmentPlan), its start crossfaded
        #    with the tail the segment before held back, and holds back its own.
        timings["vocoder_s"] = 0.0
        if plan is None:  # a clip: cut to the samples asked for
            length = int(request.seconds * SAMPLE_RATE)
            begin, emit_to = 0, _clip_emit_to(request.seconds, frames)
            end, fade = emit_to, 0
        else:
            begin, emit_to, end, fade = plan.emit_from, plan.emit_to, plan.vocode_to, plan.fade_in
            length = (emit_to - begin) * MEL_HOP
        ranges = list(_blocks(begin, emit_to, first=max(FIRST_BLOCK, fade)))
        ranges[-1] = (ranges[-1][0], end)  # the last block vocodes the held-back tail too
        sent = compiled_blocks = 0
        for index, (a, b) in enumerate(ranges):
            if callbacks.cancelled():
                raise GenerationCancelled
            t0 = time.perf_counter()
            audio, compiled = self._vocode(mel, a, b)
            timings["vocoder_s"] += time.perf_counter() - t0
            compiled_blocks += compiled
            if index == 0 and request.continuation is not None:
                head = fade * MEL_HOP
                audio[:head] = crossfade(request.continuation.tail, audio[:head])
            last = index == len(ranges) - 1
            out = audio[: min(length - sent, (min(b, emit_to) - a) * MEL_HOP)]
            continuation = None
            if last and plan is not None:
                tail = audio[(emit_to - a) * MEL_HOP :]
                rows = (plan.frames - plan.hop) // self.vae_scale
                kept = latents[0, :, -rows:].float().cpu().numpy()
                continuation = Continuation(kept, tail.copy())
            if index == 0:
                timings["first_audio_s"] = time.perf_counter() - started
                # What the VAE and the first vocoder block add after the last step.
                timings["first_audio_after_denoising_s"] = time.perf_counter() - denoised
            if last:
                timings["total_s"] = time.perf_counter() - started
                timings["vocoder"] = _share(compiled_blocks, len(ranges))
            yield AudioBlock(index, sent, out, last, timings if last else None, continuation)
            sent += len(out)
            if progressive and index == 0:  # the rest of the mel: the whole clip's, exactly
                t0 = time.perf_counter()
                first = len(mel)
                mel = torch.cat([mel, self._decode(latents)[first:]])
                timings["vae_s"] += time.perf_counter() - t0

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's log-mel (frames, bins) of `latents`."""
        scaled = (latents / self.c.vae.config.scaling_factor).to(memory_format=self._layout)
        with self._autocast():
            mel = self.c.vae.decode(scaled).sample
        return mel.float()[0, 0].contiguous()

    def _compiled(self, shape: Shape) -> Any:
        """The compiled network for `shape`, or None (eager): CPU only, as the packages are."""
        if self.compiled is None or self.device.type != "cpu":
            return None
        return self.compiled.runner(shape)

    def text_embedding(self, text: str) -> torch.Tensor:
        """L2-normalised CLAP text embedding (1, dim), cached per text."""
        if text in self._text_cache:
            self._text_cache.move_to_end(text)
            return self._text_cache[text]
        tokens = self.c.tokenizer(
            text,
            padding="max_length",
            max_length=self.c.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = self.c.text_encoder(
            tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        )
        embedding = F.normalize(out.text_embeds.float(), dim=-1)
        self._text_cache[text] = embedding
        while len(self._text_cache) > TEXT_CACHE:
            self._text_cache.popitem(last=False)
        return embedding

    def encode_audio(self, audio: np.ndarray, frames: int) -> torch.Tensor:
        """16 kHz audio -> the VAE latent (scaled) of its log-mel, cut or padded to `frames`."""
        mel = log_mel(np.asarray(audio, np.float32), self.mel_bins)[:frames]
        if len(mel) < frames:  # pad with the log floor: silence
            mel = np.pad(mel, ((0, frames - len(mel)), (0, 0)), constant_values=LOG_FLOOR)
        x = torch.from_numpy(mel)[None, None].to(self.device)
        with self._autocast():
            latent = self.c.vae.encode(x).latent_dist.mode()
        return latent.float() * self.c.vae.config.scaling_factor

    def vocode(self, mel: torch.Tensor, a: int, b: int) -> np.ndarray:
        """Waveform of mel frames [a, b), decoded with VOCODER_PAD frames around them."""
        return self._vocode(mel, a, b)[0]

    def _vocode(self, mel: torch.Tensor, a: int, b: int) -> tuple[np.ndarray, bool]:
        """`vocode`, and whether a compiled vocoder made it."""
        lo, hi = _padded(a, b, len(mel))
        if (vocoder := self._compiled(Shape("vocoder", 1, hi - lo))) is not None:
            wave = vocoder(mel[lo:hi][None].contiguous())[0]
        else:
            with self._autocast():
                wave = self.c.vocoder(mel[lo:hi][None]).float()[0]
        return wave[(a - lo) * MEL_HOP : (b - lo) * MEL_HOP].cpu().numpy(), vocoder is not None

    def _autocast(self) -> torch.autocast:
        if self.device.type == "cuda":  # fp16 on the GPU: AudioLDM's usual GPU precision
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)


def clip_frames(seconds: float, row: int) -> int:
    """Mel frames of a `seconds` clip's latent: whole latent rows of `row` frames."""
    frames = int(seconds * SAMPLE_RATE / MEL_HOP)
    return -(-frames // row) * row


def _clip_emit_to(seconds: float, frames: int) -> int:
    """The mel frames a clip vocodes: those its samples need."""
    return min(-(-int(seconds * SAMPLE_RATE) // MEL_HOP), frames)


def _padded(a: int, b: int, frames: int) -> tuple[int, int]:
    """Mel frames vocoded for [a, b): VOCODER_PAD more either side, within the clip."""
    return max(0, a - VOCODER_PAD), min(frames, b + VOCODER_PAD)


def _share(compiled: int, calls: int) -> str:
    """How a network ran, for the timings: compiled, eager, or partly compiled."""
    if not compiled:
        return "eager"
    return "compiled" if compiled == calls else "partly compiled"


def clip_shapes(seconds: float, row: int) -> list[Shape]:
    """What a guided `seconds` clip runs its networks on: the UNet's latent, and the vocoder's
    blocks (the shapes packages are compiled for: models/audioldm_compiled.py)."""
    frames = clip_frames(seconds, row)
    blocks = _blocks(0, _clip_emit_to(seconds, frames))
    lengths = [hi - lo for lo, hi in (_padded(a, b, frames) for a, b in blocks)]
    return [Shape("unet", 2, frames // row), *(Shape("vocoder", 1, n) for n in lengths)]


def _blocks(
    begin: int, end: int, first: int = FIRST_BLOCK, size: int = 200
) -> Iterator[tuple[int, int]]:
    """Mel frame ranges to vocode in turn: a short first block (0.25 s: the first audio comes
    soon after the VAE), then each twice the one before, up to 2 s: a block is vocoded in well
    under the time the audio before it plays (0.3 of it on two cores), so playback never waits
    for the next one."""
    a, b = begin, min(begin + first, end)
    while a < end:
        yield a, b
        first = min(2 * first, size)
        a, b = b, min(b + first, end)


def _inpaint(
    latents: torch.Tensor, known: torch.Tensor, noise: torch.Tensor, scheduler: Any,
    timestep: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """`latents` with their first rows set to `known`, noised to `timestep`'s level (an empty
    `timestep`: the end of denoising, where they are `known` exactly)."""
    rows = known.shape[2]
    if len(timestep):
        known = scheduler.add_noise(known, noise[:, :, :rows], timestep)
    return torch.cat([known, latents[:, :, rows:]], dim=2)


# AudioLDM's mel (its HiFi-GAN's training features): 1024-point STFT magnitude, hop 160, 64 Slaney
# mel bands over 0-8 kHz, natural log with a 1e-5 floor.
N_FFT = 1024
LOG_FLOOR = float(np.log(1e-5))


def log_mel(audio: np.ndarray, bins: int = 64) -> np.ndarray:
    """(frames, bins) log-mel of 16 kHz audio, len(audio) // 160 frames."""
    from transformers.audio_utils import mel_filter_bank

    pad = (N_FFT - MEL_HOP) // 2
    padded = np.pad(audio, pad, mode="reflect" if len(audio) > pad else "constant")
    count = max(0, (len(padded) - N_FFT) // MEL_HOP + 1)
    index = np.arange(N_FFT)[None] + MEL_HOP * np.arange(count)[:, None]
    window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as torch.hann_window
    magnitude = np.abs(np.fft.rfft(padded[index] * window, axis=-1))
    filters = mel_filter_bank(N_FFT // 2 + 1, bins, 0.0, 8000.0, SAMPLE_RATE, "slaney", "slaney")
    return np.log(np.maximum(magnitude @ filters, 1e-5)).astype(np.float32)


def mel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How different two 16 kHz clips of the same length sound: the RMS difference of their
    log-mels (natural log; 0: the same)."""
    return float(np.sqrt(np.mean((log_mel(a) - log_mel(b)) ** 2)))


def seam_ratio(audio: np.ndarray, joins: list[int]) -> float:
    """How audible the joins of 16 kHz `audio` are: the spectral change (log-mel flux, the
    largest within 20 ms either side) at sample positions `joins`, over its median everywhere.
    About 1: a join is like any other moment; a click or a jump in timbre is several times
    that."""
    mel = log_mel(np.asarray(audio, np.float32))
    flux = np.sqrt(np.mean(np.diff(mel, axis=0) ** 2, axis=1))
    local = np.array([flux[max(0, i - 2) : i + 2].max() for i in range(len(flux))])
    at = [j // MEL_HOP for j in joins if 0 < j // MEL_HOP < len(local)]
    return float(local[at].mean() / np.median(local)) if at else float("nan")


def _bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
