"""Generation reports and worker messages are plain data: each survives pickling (the pipe to the
worker process pickles them)."""

from __future__ import annotations

import pickle
from typing import Any, get_args

import numpy as np
import pytest

from models.generation import AudioBlock, GenerationRequest
from stream.engines.reports import (
    Audio,
    CancelJob,
    Cancelled,
    Done,
    Failed,
    FromWorker,
    GeneratorInfo,
    JobReport,
    LoadFailed,
    Progress,
    Queued,
    Report,
    Retrying,
    RunJob,
    Started,
    Stopped,
    StopWorker,
    ToWorker,
    WorkerReady,
    WorkerReport,
)

# One of each kind but Audio (its numpy block has no plain ==): see the test below.
MESSAGES: list[Any] = [
    Queued(2),
    Started(),
    Progress(3, 10),
    Retrying(2, "worker_crashed", "the generation worker exited (code -9) during this job"),
    Done({"total_s": 1.5, "unet_steps": [0.1, 0.2], "paused_for_analysis_s": 0.0}),
    Cancelled("superseded"),
    Failed("generation_failed", "RuntimeError: injected failure"),
    RunJob(7, GenerationRequest("pad", seconds=1.0, steps=2)),
    CancelJob(7),
    StopWorker(),
    WorkerReady(GeneratorInfo("tiny", trained=False, note="random weights", bf16=False)),
    LoadFailed("OSError: no such model"),
    JobReport(7, Stopped()),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_a_message_round_trips_through_pickle(message: Any) -> None:
    assert pickle.loads(pickle.dumps(message)) == message


def test_every_kind_of_message_is_tried() -> None:
    unions = (Report, ToWorker, FromWorker, WorkerReport)
    kinds = {kind for union in unions for kind in get_args(union)}
    inside = {type(m.report) for m in MESSAGES if isinstance(m, JobReport)}
    assert kinds == {type(m) for m in MESSAGES} | inside | {Audio}


def test_audio_and_a_variation_round_trip_with_their_samples() -> None:
    samples = np.linspace(-1, 1, 800, dtype=np.float32)
    block = AudioBlock(1, 800, samples, last=True, timings={"total_s": 2.0})
    back = pickle.loads(pickle.dumps(JobReport(3, Audio(block))))
    assert back.job_id == 3 and isinstance(back.report, Audio)
    got = back.report.block
    assert (got.index, got.start, got.last, got.timings) == (1, 800, True, {"total_s": 2.0})
    np.testing.assert_array_equal(got.audio, samples)

    request = GenerationRequest("pad", source=samples, strength=0.4)
    job = pickle.loads(pickle.dumps(RunJob(4, request)))
    assert (job.job_id, job.request.prompt, job.request.strength) == (4, "pad", 0.4)
    np.testing.assert_array_equal(job.request.source, samples)
