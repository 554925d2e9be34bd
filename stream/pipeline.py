"""Declared pipelines: what a session runs, written as data.

A pipeline names the analysers a session's chunks go through, the pattern detectors run over its
rolling context, the triggers that start generations, what a generation makes, and what is sent
back. Pipelines come from TOML files (the presets in stream/pipelines/, and any folder named by
`--pipelines-dir`) or inline, as `start.config.pipeline`. Everything is checked before a session
starts; a mistake is one clear `invalid_config` error that says where it is.

    name = "listen-and-respond"
    analyse = ["dsp", "wav2vec2"]          # among the analysers the server runs
    context_seconds = 10                   # the rolling context detectors and prompts see
    [[detect]]
    step = "keywords"
    top = 5                                # the step's own options
    [[trigger]]                            # in priority order
    step = "after_speech"
    min_speech_seconds = 1.0
    [generate]                             # absent: this pipeline does not generate
    template = "echo"
    [send]
    analysis = ["features", "vad", "transcript"]   # fields of analysis events; absent: all

Steps are looked up by name in the registries of stream/core/steps/triggers.py and detectors.py;
a new one is one class there (or in a `--plugins` module) and one entry here. docs/pipelines.md.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from stream.core.audio.pcm import Encoding
from stream.core.steps.detectors import DETECTORS, Detector
from stream.core.steps.registry import Registry
from stream.core.steps.triggers import TRIGGERS, TriggerStep
from stream.protocol import (
    FLAT_TRIGGERS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    GenerationConfig,
    GenerationOptions,
    ProtocolError,
    SessionConfig,
    WireEncoding,
    updated_generation_config,
)

DEFAULT = "default"


class PipelineError(ValueError):
    """A pipeline that cannot run; the message says where and why."""


class StepSpec(BaseModel):
    """`{"step": name, ...options}`: one detector or trigger and its options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    step: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class GenerateSpec(GenerationOptions):
    """What a generation makes (GenerationOptions), and the format of the audio sent back."""

    sample_rate: int | None = Field(None, ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)  # None: 16 kHz
    encoding: WireEncoding = Encoding.PCM_S16LE


class SendSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Fields of each `analysis` event beyond its position (seq, start, end, skipped); None: all.
    analysis: list[str] | None = None
    patterns: bool = True  # a `patterns` event after each chunk, when the pipeline detects
    audio: bool = True  # generated audio as binary frames (otherwise events only; WAV over HTTP)


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    description: str = ""
    analyse: list[str] | None = None  # None: every analyser the server runs
    context_seconds: float = Field(10.0, ge=1.0, le=60.0)
    detect: list[StepSpec] = Field(default_factory=list)
    trigger: list[StepSpec] = Field(default_factory=list)
    generate: GenerateSpec | None = None
    send: SendSpec = Field(default_factory=SendSpec)

    def with_generation(self, config: GenerationConfig) -> PipelineSpec:
        """`start.config.generation` (the protocol's flat form) over this pipeline: its
        options, context and triggers replace the pipeline's."""
        return self.model_copy(
            update={
                "generate": GenerateSpec.model_validate(
                    config.model_dump(include=set(GenerateSpec.model_fields))
                ),
                "context_seconds": config.window_seconds,
                "trigger": legacy_triggers(config),
            }
        )


# The built-in triggers the flat form names (after_speech, novelty, interval: its priority
# order), and its fields that set them.
LEGACY_TRIGGERS = tuple(step.name for step in FLAT_TRIGGERS)
LEGACY_FIELDS = {
    "triggers",
    *(flat for options in FLAT_TRIGGERS.values() for flat in options.values()),
}


def legacy_triggers(config: GenerationConfig) -> list[StepSpec]:
    """`generation.triggers` and its flat options as trigger steps (in the priority order the
    protocol documents: after_speech, novelty, interval)."""
    return [
        StepSpec(
            step=step.name, **{option: getattr(config, flat) for option, flat in fields.items()}
        )
        for step, fields in FLAT_TRIGGERS.items()
        if step.name in config.triggers
    ]


@dataclass(frozen=True)
class Pipeline:
    """A checked pipeline, ready to instantiate for a session."""

    spec: PipelineSpec
    detectors: tuple[tuple[type[Detector], Any], ...]  # (class, options)
    triggers: tuple[tuple[type[TriggerStep], Any], ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def make_detectors(self) -> list[Detector]:
        return [cls(options) for cls, options in self.detectors]

    def make_triggers(self, sample_rate: int, start: int = 0) -> list[TriggerStep]:
        return [cls(options, sample_rate, start) for cls, options in self.triggers]

    def describe(self) -> dict[str, Any]:
        """The pipeline as `ready` reports it (and GET /v1/pipelines lists it)."""
        return self.spec.model_dump(mode="json")


def resolve(
    config: SessionConfig, presets: dict[str, Pipeline], default: str, analysers: Sequence[str]
) -> Pipeline:
    """A session's pipeline from its `start.config`: a preset by name, an inline one, or the
    server's default; `config.generation` over it."""
    if isinstance(config.pipeline, dict):
        pipeline = inline(config.pipeline, analysers)
    else:
        name = config.pipeline or default
        if name not in presets:
            raise PipelineError(f"no pipeline {name!r} (known: {', '.join(sorted(presets))})")
        pipeline = presets[name]
    if config.generation is not None:
        pipeline = check(pipeline.spec.with_generation(config.generation), analysers)
    return pipeline


def with_message(pipeline: Pipeline, message: dict[str, Any], analysers: Sequence[str]) -> Pipeline:
    """A `config` message's `generation` fields over a live session's pipeline: options change;
    touching a trigger field replaces the built-in triggers (interval, novelty, after_speech)
    and keeps the others. Raises ProtocolError (recoverable) for a bad message."""
    view = generation_view(pipeline)
    config = updated_generation_config(message, view)
    spec = pipeline.spec
    generate = GenerateSpec.model_validate(
        config.model_dump(include=set(GenerateSpec.model_fields))
    )
    trigger = spec.trigger
    if LEGACY_FIELDS & set(message["generation"]):
        kept = [s for s in spec.trigger if s.step not in LEGACY_TRIGGERS]
        trigger = legacy_triggers(config) + kept
    try:
        return check(spec.model_copy(update={"generate": generate, "trigger": trigger}), analysers)
    except PipelineError as exc:
        raise ProtocolError("invalid_message", str(exc)) from None


def generation_view(pipeline: Pipeline) -> GenerationConfig:
    """The pipeline in the protocol's flat `generation` form (custom triggers left out)."""
    spec = pipeline.spec
    flat: dict[str, Any] = {"triggers": []}
    for cls, options in pipeline.triggers:
        if cls not in FLAT_TRIGGERS:
            continue
        flat["triggers"].append(cls.name)
        for option, field in FLAT_TRIGGERS[cls].items():
            flat[field] = getattr(options, option)  # a shared cooldown: the last step's
    generate = spec.generate.model_dump() if spec.generate else {}
    return GenerationConfig.model_validate(
        {**generate, **flat, "window_seconds": spec.context_seconds}
    )


def check(spec: PipelineSpec, analysers: Sequence[str]) -> Pipeline:
    """Check `spec` against the registries and the analysers this server runs."""
    where = f"pipeline {spec.name!r}"
    for name in spec.analyse or ():
        if name not in analysers:
            raise PipelineError(
                f"{where}: analyse: {name!r} is not an analyser this server runs "
                f"(it runs {', '.join(analysers)})"
            )
    detectors = [_step(where, "detect", i, s, DETECTORS) for i, s in enumerate(spec.detect)]
    triggers = [_step(where, "trigger", i, s, TRIGGERS) for i, s in enumerate(spec.trigger)]
    if triggers and spec.generate is None:
        raise PipelineError(f"{where}: trigger steps need a [generate] section to start")
    have = {cls.name for cls, _ in detectors}
    for cls, _ in triggers:  # a trigger's detectors run whether declared or not
        for needed in cls.needs:
            if needed not in have:
                detectors.append((DETECTORS[needed], DETECTORS[needed].Options()))
                have.add(needed)
    return Pipeline(spec, tuple(detectors), tuple(triggers))


def _step(where: str, stage: str, index: int, spec: StepSpec, registry: Registry[Any]) -> Any:
    place = f"{where}: {stage}[{index}]"
    if spec.step not in registry:
        known = ", ".join(registry.names())
        raise PipelineError(f"{place}: no {registry.kind} step {spec.step!r} (known: {known})")
    cls = registry[spec.step]
    known = [f.name for f in dataclasses.fields(cls.Options)]
    if unknown := sorted(set(spec.options) - set(known)):  # a typo, not something to ignore
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise PipelineError(f"{place} ({spec.step}): unknown option(s) {unknown}; {takes}")
    try:
        options = TypeAdapter(cls.Options).validate_python(spec.options)
    except ValidationError as exc:
        raise PipelineError(f"{place} ({spec.step}): {_details(exc, 'options')}") from None
    return cls, options


def load_file(path: Path) -> PipelineSpec:
    """One TOML file; its name defaults to the file's stem."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PipelineError(f"{path}: {exc}") from None
    data.setdefault("name", path.stem)
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise PipelineError(f"{path}: {_details(exc)}") from None


def load_presets(folder: str | Path | None, analysers: Sequence[str]) -> dict[str, Pipeline]:
    """The built-in presets, then the TOML files in `folder` (a name given twice: the folder's
    wins), each checked against the analysers this server runs."""
    paths = sorted(Path(str(files("stream") / "pipelines")).glob("*.toml"))
    if folder is not None:
        if not Path(folder).is_dir():
            raise PipelineError(f"pipelines folder {folder} does not exist")
        paths += sorted(Path(folder).glob("*.toml"))
    presets = {}
    for path in paths:
        spec = load_file(path)
        presets[spec.name] = check(spec, analysers)
    return presets


def inline(value: dict[str, Any], analysers: Sequence[str]) -> Pipeline:
    """`start.config.pipeline` given as an object."""
    try:
        spec = PipelineSpec.model_validate({"name": "inline", **value})
    except ValidationError as exc:
        raise PipelineError(f"pipeline: {_details(exc)}") from None
    return check(spec, analysers)


def _details(exc: ValidationError, whole: str = "pipeline") -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or whole}: {e['msg']}" for e in exc.errors()
    )
