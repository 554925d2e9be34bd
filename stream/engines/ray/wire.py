"""What crosses between a front-end, its Ray driver processes and the Serve replicas: plain frozen
data (pickled over the pipes, and by Ray across machines), no behaviour but a few read-outs.

Analysis, one call (a batch of one front-end's windows):

    RemoteAnalyser --AnalyseCall(id, windows)--> bridge --AnalyseRequest--> replica
    replica --AnalyseReply(results, ReplicaTiming)--> bridge --Analysed(id, reply)--> analyser
                                                             or CallFailed(id, message)

Generation reuses the worker's messages (stream/engines/reports.py): the replica streams
Started, Progress, Audio, then Done or Failed, as the local worker does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from models.base import AnalyserInfo, AnalysisResult, CtcFrames
from stream.core.audio.chunker import Window


class ClusterUnavailable(RuntimeError):
    """No Ray cluster answers at the address, or an application on it cannot be found, deployed
    or reached."""


# Serve application names, as operators read them in `serve status` and Ray's actor list
# (replicas show as ServeReplica:<application>:<deployment>).
ANALYSIS_APP = "wav2vec2-analysis"
GENERATION_APP = "audioldm-generation"


@dataclass(frozen=True)
class AnalysisOptions:
    """What the analysis replicas load and how they batch: the application's arguments (the
    Serve config's `args`; the front-end's settings when it deploys the application itself)."""

    model: str = "auto"
    variant: str = "int8"
    device: str = "auto"  # cuda: the CUDA execution provider (give the replicas `gpus`)
    threads: int = 2  # ONNX Runtime threads per replica (and the CPUs Ray reserves for it)
    feature_cache: str = "auto"
    norm_seconds: float = 10.0  # group-norm checkpoints: the first conv's normalisation span
    encoder: str = "fp32"  # group-norm checkpoints, int8 variant: fp32 or int8 conv encoder
    model_dir: str | None = None
    cache_dir: str | None = None
    max_batch: int = 16  # windows in one replica batch, from any front-ends
    batch_wait_ms: float = 5.0  # how long a replica batch waits to fill
    replicas: int = 1
    gpus: float = 0.0
    max_streams: int = 1024  # per-stream feature caches one replica keeps


@dataclass(frozen=True)
class GenerationOptions:
    """The generation application's arguments."""

    generator: str = "auto"
    threads: int = 1  # torch threads per replica (and the CPUs Ray reserves for it)
    bf16: str = "auto"  # on the CPU: auto, on, off
    replicas: int = 1
    gpus: float = 0.0  # > 0: the replica runs on CUDA in fp16
    # as --generation-compile(-seconds): each replica's machine compiles its packages once
    compile: str = "auto"
    compile_seconds: tuple[float, ...] = (5.0, 4.0)


@dataclass(frozen=True)
class AnalyseRequest:
    caller: str  # the front-end's id: a replica batch says how many front-ends it served
    windows: Sequence[Window]


@dataclass(frozen=True)
class ReplicaTiming:
    """One call's stay on its replica (durations: the replica's clock is not the front-end's)."""

    replica: str  # Serve's replica id
    queue_s: float  # arrival on the replica -> its batch started
    inference_s: float  # the batch's model run
    windows: int  # windows in that batch, from every call it merged
    calls: int  # calls merged into that batch
    callers: int  # front-ends among those calls

    def fields(self, round_trip_s: float) -> dict[str, Any]:
        """The `remote` object of an engine's timing: what Ray costs next to the model."""
        on_replica = self.queue_s + self.inference_s
        return {
            "transfer_ms": _ms(round_trip_s - on_replica),  # serialising, pipes, Ray's RPCs
            "replica_queue_ms": _ms(self.queue_s),
            "replica_inference_ms": _ms(self.inference_s),
            "replica_batch": self.windows,
            "replica_calls": self.calls,
            "replica_frontends": self.callers,
            "replica": self.replica,
        }


@dataclass(frozen=True)
class RemoteResult(AnalysisResult):
    """One window's result as a replica returns it: the event fields and CTC frames that the
    replica's analyser made, and the call's stay on the replica."""

    fields: dict[str, Any]
    frames: CtcFrames | None
    timing: ReplicaTiming

    def to_event(self) -> dict[str, Any]:
        return self.fields

    @property
    def ctc(self) -> CtcFrames | None:
        return self.frames


@dataclass(frozen=True)
class AnalyseReply:
    results: list[RemoteResult]


# --- front-end <-> bridge process -----------------------------------------------------------


@dataclass(frozen=True)
class AnalyseCall:
    call_id: int
    windows: Sequence[Window]


@dataclass(frozen=True)
class StopBridge:
    """End the bridge process (calls in flight are answered CallFailed)."""


@dataclass(frozen=True)
class BridgeReady:
    info: AnalyserInfo  # the deployed analyser's, as the engine and sessions read it
    gcs: str  # the cluster's GCS address the bridge joined


@dataclass(frozen=True)
class BridgeFailed:
    message: str  # why it could not start: no cluster, no application, a model that failed


@dataclass(frozen=True)
class Analysed:
    call_id: int
    reply: AnalyseReply


@dataclass(frozen=True)
class CallFailed:
    call_id: int
    message: str


ToBridge = AnalyseCall | StopBridge
FromBridge = BridgeReady | BridgeFailed | Analysed | CallFailed


def _ms(seconds: float) -> float:
    return round(max(0.0, seconds) * 1000, 3)
