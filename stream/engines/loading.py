"""Loading the wav2vec2 analyser: one function for the server's own process (`--inference
local`) and for the Ray Serve replicas (`--inference ray`), so that both run the same artefact
the same way."""

from __future__ import annotations

import logging
from pathlib import Path

from models.base import Analyser

log = logging.getLogger(__name__)


def load_wav2vec2(
    model: str,
    variant: str,
    *,
    threads: int,
    device: str,
    feature_cache: str,
    max_streams: int,
    norm_seconds: float = 10.0,
    encoder: str = "fp32",
    model_dir: str | None = None,
    cache_dir: str | None = None,
) -> Analyser:
    """Resolve the model, export it to ONNX once (cached in `cache_dir`, under a file lock, so
    that processes sharing the folder export it once between them), and open ONNX Runtime
    sessions on it. `feature_cache`: auto, on or off (Settings.analysis_feature_cache);
    `norm_seconds`: Settings.analysis_norm_seconds; `encoder`: Settings.analysis_encoder."""
    from models.char_lm import LanguageModelError, find_language_model
    from models.export import ensure_artifact
    from models.wav2vec2_runtime import Wav2Vec2Analyser

    artifact = ensure_artifact(model, variant, model_dir=model_dir, cache_dir=cache_dir)
    group_norm = artifact.meta.get("feat_extract_norm") == "group"
    # A frame's features depend on its window only with group norm over each window.
    window_bound = group_norm and norm_seconds <= 0
    reuse = feature_cache == "on" or (feature_cache == "auto" and not window_bound)
    if group_norm:
        log.info(
            "wav2vec2: the first conv layer is normalised over %s",
            f"each stream's last {norm_seconds:g} s" if norm_seconds > 0 else "each window",
        )
    if reuse and window_bound:
        log.warning(
            "analysis_feature_cache=on with analysis_norm_seconds=0 on a group-norm checkpoint: "
            "reused conv features were normalised over an earlier window, so results differ "
            "from computing each window whole (docs/fidelity.md measures by how much)"
        )
    language_model = None
    # Loaded even when the default is greedy: a session may ask for beam search.
    if artifact.spec.path is not None:
        try:
            language_model = find_language_model(Path(artifact.spec.path))
        except LanguageModelError as exc:  # usable without it: beam search alone, or greedy
            log.warning("language model not used: %s", exc)
    analyser = Wav2Vec2Analyser(
        artifact.folder,
        threads,
        device,
        feature_cache=reuse,
        max_streams=max_streams,
        norm_seconds=norm_seconds,
        language_model=language_model,
        encoder=encoder,
    )
    if encoder != analyser.encoder:
        log.warning(
            "analysis_encoder=%s: %s has no such conv encoder (int8 exists for the int8 variant "
            "of group-norm checkpoints); running the %s one",
            encoder, analyser.model_label, analyser.encoder,
        )  # fmt: skip
    elif group_norm:
        log.info("wav2vec2: the conv encoder runs in %s", analyser.encoder)
    log.info(
        "wav2vec2 %s: input %s (do_normalize from %s)",
        analyser.model_label,
        "normalised to zero mean and unit variance"
        if analyser.normalises_input
        else "passed as it is, not normalised",
        analyser.normalise_source,
    )
    info = analyser.info
    if info.note or not info.trained:  # a demo or random model: say so, loudly
        advice = "" if info.trained else "; use --analysis-model base (or a checkpoint)"
        log.warning(
            "wav2vec2 model %s: %s%s", info.label, info.note or "random weights (untrained)", advice
        )
    return analyser
