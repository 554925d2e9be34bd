"""All server settings in one place: defaults here, then `GRYM_*` environment variables, then
command-line flags (highest). Printed at start-up (secrets masked)."""

from __future__ import annotations

import os
import re
import socket
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from stream.core.audio.turns import TurnSettings
from stream.core.text.ctc_beam import BeamSettings
from stream.retry import RetryPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRYM_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per line, with session ids"
    )

    # Access control; both off by default (the server listens on loopback).
    token: SecretStr | None = None
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="browser Origins allowed to connect (comma-separated); empty = any",
    )

    # HTTPS/WSS (browsers give microphones to pages on localhost or HTTPS only).
    tls: Literal["off", "self-signed"] = Field(
        "off", description="self-signed: make (once) and use a certificate for this host"
    )
    tls_cert: str | None = Field(None, description="PEM certificate file: serve HTTPS/WSS")
    tls_key: str | None = Field(None, description="PEM private key file of --tls-cert")

    # WebRTC: ICE uses host candidates only unless STUN/TURN servers are named here.
    webrtc_ice_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="STUN/TURN URLs for WebRTC (comma-separated), e.g. stun:stun.example.org:3478",
    )

    # Limits (docs/protocol.md, "Limits and abuse").
    max_sessions: int = Field(64, ge=1, description="live sessions (held by a connection)")
    max_sessions_per_client: int | None = Field(
        None, ge=1, description="live sessions one client address may hold; none = no own limit"
    )
    max_detached_sessions: int = Field(
        64, ge=0, description="sessions waiting for a resume; the oldest is finalised for a new one"
    )
    max_detached_per_client: int = Field(
        8, ge=0, description="of those, from one client address (its own oldest goes first)"
    )
    max_messages_per_second: float = Field(
        250.0, gt=0, description="text messages or tiny frames a session may send per second"
    )
    max_audio_speed: float = Field(
        20.0, gt=0, description="seconds of audio a `skip` session may send per second"
    )
    max_frame_seconds: float = Field(1.0, gt=0, le=10)
    max_session_seconds: float = Field(4 * 3600.0, gt=0)
    start_timeout_seconds: float = Field(10.0, gt=0)
    resume_grace_seconds: float = Field(
        60.0, ge=0, description="a session whose connection broke waits this long for a resume"
    )
    drain_seconds: float = Field(
        0.0, ge=0, le=600,
        description="at SIGTERM, keep serving this long with /readyz at 503 before closing, so "
        "a balancer's health checks move new sessions elsewhere",
    )  # fmt: skip
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="on SIGTERM/Ctrl-C, time live sessions get to finish"
    )
    close_timeout_seconds: float = Field(
        5.0, gt=0, description="time a closing session's last events get to reach the client"
    )
    slow_consumer_seconds: float = Field(
        30.0, gt=0, description="an event unsent this long: the client is failed as slow"
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="a connection must send a whole request's headers this soon"
    )
    ws_ping_interval_seconds: float = Field(
        20.0, gt=0, description="WebSocket keepalive pings; a peer that misses one is gone"
    )
    ws_ping_timeout_seconds: float = Field(20.0, gt=0, description="time to answer a ping")

    # Chunking: analysis windows of `chunk` seconds, with context around them.
    chunk_seconds: float = Field(1.0, ge=0.1, le=30)
    left_context_seconds: float = Field(1.0, ge=0, le=30)  # docs/fidelity.md
    lookahead_seconds: float = Field(0.0, ge=0, le=5)

    # Back-pressure.
    when_behind: Literal["skip", "wait"] = "skip"
    max_backlog_chunks: int = Field(2, ge=1, description="waiting chunks per session before skip")
    outbound_queue: int = Field(256, ge=8, description="unsent events per session before close")

    # Analysis models and engines (one engine per model, shared by all sessions).
    analysis_model: str = Field(
        "auto",
        description="wav2vec2 model: auto, tiny, tiny-random, base, base-random, a hub id or a "
        "folder; none = DSP analysis only",
    )
    analysis_variant: Literal["fp32", "fp32-opt", "int8"] = "int8"
    analysis_device: Literal["auto", "cpu", "cuda"] = "auto"
    analysis_threads: int = Field(
        1, ge=1, description="ONNX Runtime threads of each wav2vec2 worker"
    )
    # One single-threaded run per core outran one run on every core: on 2 cores, 1.6x the
    # windows per second (a run's small ops wait for their slowest thread, more so while other
    # work shares the cores); a window's own latency grows instead (BENCHMARKS.md).
    analysis_workers: int = Field(
        0,
        ge=0,
        description="wav2vec2 runs in parallel (each with analysis_threads); 0 = one per usable "
        "CPU core (2 where the model runs on a GPU); with --inference ray, calls in flight to "
        "the deployment (0: 2)",
    )
    analysis_feature_cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="reuse each stream's conv features across overlapping windows; auto = on "
        "where frames do not depend on their window: layer-norm checkpoints, and group-norm "
        "ones with analysis_norm_seconds > 0 (docs/fidelity.md)",
    )
    analysis_norm_seconds: float = Field(
        10.0,
        ge=0,
        le=600,
        description="group-norm checkpoints (wav2vec2-base): normalise the first conv layer "
        "over each stream's last N seconds, as one pass over them would; 0 = over each window "
        "(models/conv_norm.py)",
    )
    analysis_encoder: Literal["fp32", "int8"] = Field(
        "fp32",
        description="the conv encoder of group-norm checkpoints (wav2vec2-base) with the int8 "
        "variant: int8 = int8 matrix products with a scale per row, 2.9x faster, a little "
        "less exact (economy mode: docs/fidelity.md); other checkpoints keep fp32",
    )
    ctc_decoder: Literal["auto", "greedy", "beam"] = Field(
        "auto",
        description="CTC transcripts (sessions may choose their own): beam = prefix beam search, "
        "with the model's character LM when its folder has one (language_model/); greedy = "
        "each frame's best token; auto = beam where the model has an LM, else greedy",
    )
    ctc_beam_width: int = Field(
        BeamSettings.width, ge=1, le=256, description="texts the beam search keeps"
    )
    # End of speech (stream/core/audio/turns.py): where transcript finals cut utterances and
    # the OpenAI-compatible endpoint commits turns; sessions may choose their own.
    vad_threshold: float = Field(
        TurnSettings.threshold, ge=0.05, le=0.95, description="speech probability that is speech"
    )
    vad_min_speech_ms: int = Field(
        TurnSettings.min_speech_ms, ge=0, le=5000, description="speech that starts a turn"
    )
    vad_min_silence_ms: int = Field(
        TurnSettings.min_silence_ms,
        ge=20,
        le=10000,
        description="silence that ends a turn: shorter cuts at pauses, longer delays finals",
    )
    vad_prefix_padding_ms: int = Field(
        TurnSettings.prefix_padding_ms, ge=0, le=5000, description="audio kept before a turn"
    )
    analysis_batch_max: int = Field(16, ge=1, description="most windows in one analysis batch")
    analysis_max_wait_ms: float = Field(
        5.0, ge=0, description="how long a batch waits for other sessions' chunks"
    )
    analysis_attempts: int = Field(
        2, ge=1, le=10, description="tries of a failing analysis batch before its chunks fail"
    )
    analysis_timeout_seconds: float = Field(
        30.0, gt=0, description="an analysis batch running longer is abandoned and retried"
    )
    analysis_backoff_seconds: float = Field(
        0.1, ge=0, description="wait before retrying an analysis batch (doubles each time)"
    )
    # Where the models run (docs/deployment.md, section 7): in this process and its generation
    # worker, or as Ray Serve deployments on a Ray cluster (pip install 'grym-stream[ray]').
    inference: Literal["local", "ray"] = Field(
        "local", description="local: models run here; ray: on the Ray Serve cluster --ray-address"
    )
    ray_address: str = Field(
        "auto", description="the Ray cluster's GCS address host:port; auto = the local one"
    )
    ray_analysis_replicas: int = Field(
        1, ge=1, description="with --inference ray, if this front-end deploys the analysis app"
    )
    ray_analysis_gpus: float = Field(
        0.0, ge=0, description="GPUs per analysis replica (with --analysis-device cuda)"
    )
    ray_generation_replicas: int = Field(
        1, ge=1, description="with --inference ray, if this front-end deploys the generation app"
    )
    ray_generation_gpus: float = Field(
        0.0, ge=0, description="GPUs per generation replica (> 0: CUDA, fp16)"
    )
    ray_batch_wait_ms: float = Field(
        5.0, ge=0, description="how long an analysis replica's batch waits for more windows"
    )
    # Pipelines: what sessions run (docs/pipelines.md).
    pipeline: str = Field(
        "default", description="the pipeline of sessions that name none (a preset or a file's)"
    )
    pipelines_dir: str | None = Field(
        None, description="a folder of pipeline TOML files, next to the built-in presets"
    )
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="modules to import at start (comma-separated): their steps register",
    )
    # Generation (one worker process shared by all sessions).
    generator: str = Field(
        "auto",
        description="AudioLDM: auto, tiny, s-full, s-random, a hub id or a diffusers-layout "
        "folder; none = no generation",
    )
    # At idle priority the worker only gets the cores analysis leaves free, so it may have all
    # of them: a clip is made with every core while analysis sleeps (BENCHMARKS.md).
    generation_threads: int = Field(
        0,
        ge=0,
        description="torch threads of the generation worker; 0 = one per usable CPU core with "
        "--generation-priority idle, else 1 (with Ray: per replica, 0 = 1)",
    )
    generation_priority: Literal["idle", "low", "normal"] = Field(
        "idle",
        description="CPU priority of the generation worker: idle (SCHED_IDLE: only cores analysis "
        "leaves free), low (nice 19) or normal",
    )
    generation_bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 autocast for the generator (auto: where the CPU supports it)"
    )
    # The UNet and vocoder compiled ahead of time (models/audioldm_compiled.py): a UNet step 2x,
    # a vocoder block 1.3x for AudioLDM-S. A machine's first start compiles in the background
    # (about 3 minutes per length on two cores) while clips run eagerly; later starts load the
    # packages from cache_dir.
    generation_compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="compile the generator's UNet and vocoder ahead of time for "
        "--generation-compile-seconds "
        "(auto: on a bf16 CPU for UNets of 50M+ parameters, e.g. AudioLDM-S; not tiny)",
    )
    generation_compile_seconds: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 4.0],
        description="clip lengths compiled (comma-separated): the default clip and the "
        "soundtrack preset's segments; other lengths run eagerly",
    )
    generation_queue: int = Field(8, ge=1, description="generations waiting, all sessions")
    generation_stall_seconds: float = Field(
        120.0, gt=0, description="a generation step silent this long: the worker is restarted"
    )
    generation_attempts: int = Field(
        2, ge=1, le=10, description="tries of a generation whose worker crashed or hung"
    )
    generation_drain_seconds: float = Field(
        60.0, ge=0, description="at a session's stop, how long its generations may finish"
    )
    # Persisted context: SQLite + audio files in data_dir (sessions, timelines, generations),
    # or one PostgreSQL database shared by several front-ends (docs/deployment.md).
    persist: bool = Field(True, description="keep each session's context (data_dir or --store)")
    data_dir: str = Field("data", description="where the database and generated audio live")
    store: str | None = Field(
        None,
        description="postgresql://user@host:port/db: a store shared by several front-ends "
        "(default: SQLite in data_dir, one server)",
    )
    frontend_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="this server's name among front-ends (in ready, /healthz, logs, metrics)",
    )
    lease_seconds: float = Field(
        10.0, gt=0, le=600,
        description="with --store: a front-end that cannot renew its sessions' leases this long "
        "loses them to any other",
    )  # fmt: skip
    store_batch_seconds: float = Field(
        0.05, gt=0, le=10, description="the store's writer gathers writes this long per commit"
    )
    retention_days: float = Field(30.0, gt=0, description="sessions older than this are deleted")
    retention_gb: float = Field(5.0, gt=0, description="generated audio kept, at most (GB)")
    retention_interval_seconds: float = Field(
        3600.0, gt=0, description="how often the retention limits are enforced (and at start)"
    )
    # Traces (stream/session/tracing.py; pip install 'grym-stream[otel]'): off unless set.
    otel_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector to export traces to, e.g. http://127.0.0.1:4318 "
        "(spans go to its /v1/traces): a trace per session, a span per chunk and stage",
    )
    otel_service_name: str = Field("grym-stream", description="service.name of the traces")
    model_dir: str | None = Field(None, description="folder of local checkpoints")
    cache_dir: str | None = Field(
        None, description="where exported ONNX models are kept (default ~/.cache/grym-stream)"
    )

    @field_validator("store")
    @classmethod
    def _postgresql_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"postgres(ql)?://", value):
            raise ValueError("the store is a postgresql:// URL (SQLite is the default: data_dir)")
        return value

    @field_validator("otel_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+", value):
            raise ValueError("the OTLP endpoint is an http:// or https:// URL")
        return value

    @field_validator(
        "allowed_origins", "webrtc_ice_servers", "plugins", "generation_compile_seconds",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @property
    def analysis_retry(self) -> RetryPolicy:
        return RetryPolicy(
            attempts=self.analysis_attempts,
            timeout_seconds=self.analysis_timeout_seconds,
            backoff_seconds=self.analysis_backoff_seconds,
        )

    def describe(self) -> str:
        """One line per setting, for the start-up banner."""
        lines = []
        for name, value in self.model_dump().items():
            if name == "token":
                value = "(set)" if value else "(off)"
            elif name == "store" and value:  # a password in the URL is not printed
                value = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", value)
            lines.append(f"  {name:<22} {value}")
        return "\n".join(lines)
