"""Declared pipelines: specs checked with clear errors, presets that behave as they say, and a
plugin that adds an analyser, a detector and a trigger, each one class and one config entry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from clients.stream_client import ServerError, StreamClient, StreamResult
from stream.pipeline import (
    PipelineError,
    PipelineSpec,
    check,
    generation_view,
    inline,
    load_file,
    load_presets,
    resolve,
    with_message,
)
from stream.protocol import GenerationConfig, SessionConfig
from tests.conftest import RunningServer, run_server, serve_process, tone

ANALYSERS = ["dsp", "wav2vec2"]
RATE = 16_000


def test_the_presets_load_and_say_what_they_do() -> None:
    presets = load_presets(None, ANALYSERS)
    assert {"default", "analyse-only", "listen-and-respond", "continuous-variation"} <= set(presets)
    assert presets["default"].spec.generate is not None and not presets["default"].triggers
    assert presets["analyse-only"].spec.generate is None
    assert [c.name for c, _ in presets["listen-and-respond"].triggers] == ["after_speech"]
    variation = presets["continuous-variation"]
    assert variation.spec.analyse == ["dsp"] and variation.spec.generate.mode == "variation"
    # Its novelty trigger brings the novelty detector along, though the file does not name it.
    assert [c.name for c, _ in variation.detectors] == ["rhythm", "novelty"]
    soundtrack = presets["soundtrack"].spec
    assert soundtrack.generate.mode == "continuous" and soundtrack.generate.hop == 2.0
    assert not presets["soundtrack"].triggers
    assert all(p.spec.description for p in presets.values())


@pytest.mark.parametrize(
    ("declared", "says"),
    [
        ({"analyse": ["dsp", "whisper"]}, "analyse: 'whisper' is not an analyser this server "
                                          "runs (it runs dsp, wav2vec2)"),
        ({"detect": [{"step": "tempo"}]}, "detect[0]: no detector step 'tempo' (known: balance,"),
        ({"trigger": [{"step": "interval", "seconds": 0.5}], "generate": {}},
         "trigger[0] (interval): seconds: Input should be greater than or equal to 1"),
        ({"trigger": [{"step": "novelty", "on": 0.2, "off": 0.5}], "generate": {}},
         "trigger[0] (novelty): options: Value error, off must not exceed on (hysteresis)"),
        ({"trigger": [{"step": "interval", "every": 3}], "generate": {}},
         "trigger[0] (interval): unknown option(s) ['every']; it takes seconds"),
        ({"trigger": [{"step": "interval"}]}, "trigger steps need a [generate] section"),
        ({"generate": {"steps": 0}}, "pipeline: generate.steps: Input should be greater than"),
        ({"send": {"everything": True}}, "pipeline: send.everything: Extra inputs are not"),
        ({"detectors": []}, "pipeline: detectors: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_mistakes_are_one_clear_error(declared: dict[str, Any], says: str) -> None:
    with pytest.raises(PipelineError) as caught:
        inline(declared, ANALYSERS)
    assert says in str(caught.value)


def test_toml_files_and_their_errors(tmp_path: Path) -> None:
    (tmp_path / "night-watch.toml").write_text(
        'description = "quiet hours"\n[[detect]]\nstep = "loudness"\n'
        '[[trigger]]\nstep = "interval"\nseconds = 30\n[generate]\ntemplate = "foley"\n'
    )
    presets = load_presets(tmp_path, ANALYSERS)
    watch = presets["night-watch"]  # named after its file
    assert watch.spec.generate.template == "foley" and watch.make_triggers(RATE)[0].name
    (tmp_path / "broken.toml").write_text("[[trigger]\nstep = 1\n")
    with pytest.raises(PipelineError, match=r"broken\.toml: .*line 1"):
        load_presets(tmp_path, ANALYSERS)
    with pytest.raises(PipelineError, match="does not exist"):
        load_presets(tmp_path / "nowhere", ANALYSERS)
    assert load_file(tmp_path / "night-watch.toml").name == "night-watch"


def test_the_flat_generation_config_maps_onto_trigger_steps() -> None:
    presets = load_presets(None, ANALYSERS)
    flat = GenerationConfig(
        triggers=["interval", "after_speech"], interval_seconds=4, min_speech_seconds=2,
        seconds=2.0, window_seconds=6,
    )  # fmt: skip
    config = SessionConfig(pipeline="analyse-only", generation=flat)
    pipeline = resolve(config, presets, "default", ANALYSERS)
    # The documented priority: after_speech before interval; the detectors stay the preset's.
    assert [(c.name, o) for c, o in pipeline.triggers] == [
        ("after_speech", pipeline.triggers[0][1]), ("interval", pipeline.triggers[1][1])
    ]  # fmt: skip
    assert pipeline.triggers[1][1].seconds == 4 and pipeline.spec.context_seconds == 6
    assert len(pipeline.detectors) == 6 and pipeline.spec.generate.seconds == 2.0
    with pytest.raises(PipelineError, match="no pipeline 'nightly'"):
        resolve(SessionConfig(pipeline="nightly"), presets, "default", ANALYSERS)


def test_the_flat_form_and_the_trigger_steps_translate_both_ways() -> None:
    """One table (protocol.FLAT_TRIGGERS) maps the flat fields onto step options and back."""
    flat = GenerationConfig(
        triggers=["interval", "novelty", "after_speech"], interval_seconds=7, novelty_on=0.5,
        novelty_off=0.4, cooldown_seconds=2, min_speech_seconds=0.5, window_seconds=6,
    )  # fmt: skip
    pipeline = check(PipelineSpec().with_generation(flat), ANALYSERS)
    assert [s.model_dump() for s in pipeline.spec.trigger] == [
        {"step": "after_speech", "min_speech_seconds": 0.5, "cooldown_seconds": 2.0},
        {"step": "novelty", "on": 0.5, "off": 0.4, "cooldown_seconds": 2.0},
        {"step": "interval", "seconds": 7.0},
    ]
    view = generation_view(pipeline)
    assert view.triggers == ["after_speech", "novelty", "interval"]  # in priority order
    assert view.model_dump(exclude={"triggers"}) == flat.model_dump(exclude={"triggers"})


def test_a_config_message_changes_built_in_triggers_and_keeps_the_rest() -> None:
    spec = PipelineSpec(
        generate={"seconds": 3.0},
        trigger=[{"step": "novelty"}, {"step": "interval", "seconds": 20}],
    )
    pipeline = check(spec, ANALYSERS)
    quieter = with_message(pipeline, {"type": "config", "generation": {"steps": 4}}, ANALYSERS)
    assert quieter.spec.generate.steps == 4 and quieter.spec.trigger == spec.trigger
    faster = with_message(
        pipeline, {"type": "config", "generation": {"interval_seconds": 5}}, ANALYSERS
    )
    assert [(c.name, getattr(o, "seconds", None)) for c, o in faster.triggers] == [
        ("novelty", None), ("interval", 5.0)
    ]  # fmt: skip


async def tone_then_noise(
    tone_seconds: float, noise_seconds: float, rate: int = RATE
) -> AsyncIterator[np.ndarray]:
    rng = np.random.default_rng(3)
    audio = np.concatenate(
        [
            tone(tone_seconds, rate, freq=200.0, amplitude=0.3),
            (0.3 * rng.standard_normal((round(noise_seconds * rate), 1))).astype(np.float32),
        ]
    )
    for i in range(0, len(audio), rate // 10):
        yield audio[i : i + rate // 10]


@pytest.fixture(scope="module")
def gen_server() -> Iterator[RunningServer]:
    with run_server(generator="tiny", analysis_model="tiny-random") as running:
        yield running


async def run(server: RunningServer, config: dict[str, Any], audio: Any) -> StreamResult:
    client = StreamClient(server.ws, RATE, 1, config={"when_behind": "wait", **config})
    return await client.run(audio, realtime=False)


async def test_analyse_only_finds_patterns_and_never_generates(gen_server: RunningServer) -> None:
    client = StreamClient(
        gen_server.ws, RATE, 1, config={"pipeline": "analyse-only", "when_behind": "wait"}
    )

    def ask_once(event: dict[str, Any]) -> None:
        if event["type"] == "analysis" and event["seq"] == 0:
            asyncio.ensure_future(client.send_control({"type": "generate"}))

    client.on_event = ask_once
    result = await client.run(tone_then_noise(3.0, 0.0), realtime=False)
    assert result.ready["pipeline"]["name"] == "analyse-only"
    patterns = [e for e in result.events if e["type"] == "patterns"]
    assert [p["seq"] for p in patterns] == [e["seq"] for e in result.analysis]
    last = patterns[-1]
    assert set(last) >= {"loudness", "rhythm", "pitch", "balance", "repetition", "keywords"}
    assert last["window"] == {"start": 0.0, "end": 3.0}
    assert 150 < last["pitch"]["low_hz"] <= 200 <= last["pitch"]["high_hz"] < 250  # the tone
    assert [e["code"] for e in result.errors] == ["generation_disabled"]
    assert not any(e["type"].startswith("generation.") for e in result.events)
    # The findings are kept with the timeline.
    async with httpx.AsyncClient(base_url=gen_server.http) as http:
        session = result.ready["session"]
        timeline = (await http.get(f"/v1/sessions/{session}/timeline")).json()
        listed = (await http.get("/v1/pipelines")).json()
    assert timeline[-1]["patterns"]["pitch"] == last["pitch"]
    assert listed["default"] == "default" and "listen-and-respond" in listed["pipelines"]


async def test_listen_and_respond_answers_when_an_utterance_ends(
    gen_server: RunningServer, speech_wav: Path
) -> None:
    speech, rate = sf.read(speech_wav, dtype="float32", always_2d=True)
    audio = np.concatenate([speech, np.zeros((3 * rate, 1), np.float32)])

    async def blocks() -> AsyncIterator[np.ndarray]:
        for i in range(0, len(audio), rate // 10):
            yield audio[i : i + rate // 10]

    config = {"pipeline": "listen-and-respond", "when_behind": "wait"}
    client = StreamClient(gen_server.ws, rate, 1, config=config)
    result = await client.run(blocks(), realtime=False)
    started = [e for e in result.events if e["type"] == "generation.started"]
    assert len(started) == 1 and started[0]["trigger"]["reason"] == "after_speech"
    assert started[0]["trigger"]["speech_seconds"] >= 1.0
    assert started[0]["prompt"]["template"] == "echo"
    assert result.generation(1)[-1]["type"] == "generation.done"


async def test_an_inline_pipeline_chooses_analysers_fields_and_audio(
    gen_server: RunningServer,
) -> None:
    pipeline = {
        "analyse": ["dsp"],
        "trigger": [{"step": "interval", "seconds": 2}],
        "generate": {"mode": "variation", "seconds": 0.5, "steps": 2},
        "send": {"analysis": ["features"], "audio": False, "patterns": False},
    }
    result = await run(gen_server, {"pipeline": pipeline}, tone_then_noise(3.0, 0.0))
    assert result.ready["analysers"] == ["dsp"] and result.ready["pipeline"]["name"] == "inline"
    for event in result.analysis:  # only what was asked for: no vad, no wav2vec2
        assert set(event) - {"n", "client_time", "client_latency_ms", "latency_ms"} == {
            "type", "session", "seq", "start", "end", "skipped", "features"
        }  # fmt: skip
    done = result.generation(1)[-1]
    assert done["type"] == "generation.done" and done["samples"] > 0
    assert result.generation(1)[1]["mode"] == "variation" and not result.audio  # no frames
    async with httpx.AsyncClient(base_url=gen_server.http) as http:
        for _ in range(50):  # the clip's file is written off the loop as the session ends
            clip = await http.get(f"/v1/sessions/{result.ready['session']}/generations/1.wav")
            if clip.status_code == 200:
                break
            await asyncio.sleep(0.1)
    assert clip.status_code == 200 and len(clip.content) > 44


async def test_a_bad_inline_pipeline_is_refused_before_the_session(
    gen_server: RunningServer,
) -> None:
    with pytest.raises(ServerError, match="invalid_config.*no trigger step 'sometimes'"):
        await run(
            gen_server, {"pipeline": {"trigger": [{"step": "sometimes"}]}}, tone_then_noise(1, 0)
        )


async def test_a_plugin_adds_an_analyser_a_detector_and_a_trigger(tmp_path: Path) -> None:
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "bright-response.toml").write_text(
        'analyse = ["dsp", "brightness"]\n'
        '[[detect]]\nstep = "peak"\n'
        '[[trigger]]\nstep = "bright"\nthreshold = 0.5\n'
        "[generate]\nseconds = 0.5\nsteps = 2\n"
    )
    proc, port = serve_process(
        tmp_path, "--plugins", "tests.plugin_steps", "--pipelines-dir", str(pipelines),
        "--analysis-model", "none", "--generator", "tiny", "--pipeline", "bright-response",
    )  # fmt: skip
    try:
        client = StreamClient(f"ws://127.0.0.1:{port}/v1/stream", RATE, 1,
                              config={"when_behind": "wait"})  # fmt: skip
        result = await client.run(tone_then_noise(2.0, 1.0), realtime=False)
    finally:
        proc.terminate()
        proc.wait(30)
    assert result.ready["analysers"] == ["dsp", "brightness"]
    shares = [e["brightness"]["high_share"] for e in result.analysis]
    assert shares[0] < 0.01 and shares[2] > 0.5  # the hum, then the hiss
    peaks = [e["peak"] for e in result.events if e["type"] == "patterns"]
    assert len(peaks) == 3 and peaks[2] > peaks[0]
    started = result.generation(1)[1]
    assert started["trigger"]["reason"] == "bright" and started["trigger"]["at"] == 3.0
    assert result.generation(1)[-1]["type"] == "generation.done"


async def test_a_server_refuses_to_start_with_a_broken_pipeline_file(tmp_path: Path) -> None:
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "typo.toml").write_text('[[detect]]\nstep = "loudnes"\n')
    with pytest.raises(AssertionError, match="typo.*no detector step 'loudnes'"):
        serve_process(tmp_path, "--pipelines-dir", str(tmp_path / "pipelines"),
                      "--analysis-model", "none", "--generator", "none")  # fmt: skip
