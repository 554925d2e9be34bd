"""The browser client in a real Chromium (Debian's, driven by Playwright), both modes.

A fake microphone plays held-out speech from a WAV file (Chromium's fake-media flags); the page
connects to a real server on 127.0.0.1, shows the analysis and the transcript, triggers a
generation whose audio it plays, and stops; its DOM counters are compared with the server's
`end`. A screenshot per mode is saved as a test artifact (.cache/test-artifacts/, or
$GRYM_TEST_ARTIFACTS); GRYM_UPDATE_SCREENSHOTS=1 refreshes the ones committed under docs/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr

from models.training.synth import Voice, synthesize
from tests.conftest import RunningServer, run_server
from tests.test_trained_model import SENTENCES as UNSEEN
from tests.test_trained_model import word_recall

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parent.parent
# Screenshots are test artifacts; GRYM_UPDATE_SCREENSHOTS=1 also refreshes the committed ones.
ARTIFACTS = Path(os.environ.get("GRYM_TEST_ARTIFACTS", ROOT / ".cache" / "test-artifacts"))
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed: `make test` installs it (apt), run it as root",
)
SENTENCES = UNSEEN[3:5]
VOICE = Voice(base="en-us", variant="", speed=150, pitch=50)
CONTINUOUS_S = 20  # of a continuous stream played in the page


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sentences of unseen text at 48 kHz, then silence (the fake device repeats the file's last
    buffer after a %noloop file ends, so the tail must be silent)."""
    gap = np.zeros(8000, np.float32)
    speech = np.concatenate([part for s in SENTENCES for part in (synthesize(s, VOICE), gap)])
    audio = soxr.resample(speech, 16000, 48000).astype(np.float32)
    audio = np.concatenate([np.zeros(4800, np.float32), audio, np.zeros(48000 * 30, np.float32)])
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    sf.write(path, audio, 48000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def page_server() -> Iterator[RunningServer]:
    with run_server(generator="tiny", analysis_model="tiny") as running:
        yield running


def chromium_args(wav: Path) -> list[str]:
    """(Playwright gives each launch a fresh profile of its own.)"""
    return [
        "--headless=new", "--no-sandbox", "--disable-gpu",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        # Off the network: nothing phones home, no STUN (the page sets no ICE servers).
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-quic", "--disable-features=MediaRouter",
        "--autoplay-policy=no-user-gesture-required",
    ]  # fmt: skip


# A test instrument for WebRTC mode (the page's own code is unchanged; this wraps the browser's
# RTCPeerConnection before the page runs): the time each encoded audio frame leaves the page's
# sender (through an encoded-frame transform), the time each analysis event arrives on the data
# channel, and the inbound track's stats (the generated audio coming back).
RTC_PROBE = """(() => {
  const Native = window.RTCPeerConnection;
  const probe = (window.__probe = { sent: [], events: [], pcs: [] });
  function sent(frame, controller) {
    const meta = frame.getMetadata ? frame.getMetadata() : {};
    probe.sent.push([meta.rtpTimestamp ?? frame.timestamp, performance.now()]);
    controller.enqueue(frame);
  }
  window.RTCPeerConnection = function (config, ...rest) {
    const pc = new Native({ ...(config || {}), encodedInsertableStreams: true }, ...rest);
    probe.pcs.push(pc);
    const addTrack = pc.addTrack.bind(pc);
    pc.addTrack = (...args) => {
      const sender = addTrack(...args);
      const { readable, writable } = sender.createEncodedStreams();
      readable.pipeThrough(new TransformStream({ transform: sent })).pipeTo(writable);
      return sender;
    };
    const createDataChannel = pc.createDataChannel.bind(pc);
    pc.createDataChannel = (...args) => {
      const channel = createDataChannel(...args);
      channel.addEventListener("message", (e) => {
        const event = JSON.parse(e.data);
        if (event.type !== "analysis") return;
        probe.events.push([event.end, performance.now(), event.latency_ms]);
      });
      return channel;
    };
    pc.addEventListener("track", (e) => {
      const { readable, writable } = e.receiver.createEncodedStreams();
      readable.pipeTo(writable);
    });
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
})();"""
INBOUND_STATS = """async () => {
  const report = await window.__probe.pcs[0].getStats();
  const inbound = [...report.values()].find((s) => s.type === "inbound-rtp" && s.kind === "audio");
  const keys = ["totalSamplesReceived", "concealedSamples", "concealmentEvents",
                "jitterBufferDelay", "jitterBufferEmittedCount", "packetsLost"];
  return Object.fromEntries(keys.map((k) => [k, inbound ? inbound[k] : null]));
}"""


def browser_to_event(probe: dict[str, Any], received: int) -> dict[str, Any]:
    """Per analysis event: from the page's sender handing over the frame that held the chunk's
    last sample, to the event reaching the page (`latency_ms`), and that less the server's own
    `latency_ms` (`transport_ms`). The server counts samples from the first packet it received:
    the page's first encoded frame (Chromium encodes once the connection is up; nothing is lost
    on one machine). `uncounted_frames`: frames sent that the server never counted (0 when it
    holds none back: aiortc's own jitter buffer kept the last 4)."""
    sent = probe["sent"]
    frame = int(np.median(np.diff([ts for ts, _ in sent]))) if len(sent) > 1 else 960
    latency, transport = [], []
    for end, arrived, server_ms in probe["events"]:
        k = max(0, int(np.ceil(round(end * 48000) / frame)) - 1)
        if k < len(sent):
            latency.append(round(arrived - sent[k][1], 1))
            transport.append(round(latency[-1] - server_ms, 1))
    return {
        "latency_ms": latency,
        "transport_ms": transport,
        "p50_ms": float(np.median(latency)) if latency else None,
        "transport_p50_ms": float(np.median(transport)) if transport else None,
        "frames_sent": len(sent),
        "frame_samples": frame,
        "uncounted_frames": len(sent) - received // frame,
    }


@pytest.mark.parametrize("mode", ["websocket", "webrtc"])
async def test_the_page_streams_shows_analysis_and_plays_generations(
    mode: str, page_server: RunningServer, mic_wav: Path
) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=chromium_args(mic_wav)
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            if mode == "webrtc":
                await page.add_init_script(RTC_PROBE)
            await page.goto(page_server.http + "/")
            await page.select_option("#mode", mode)
            await page.fill("#every", "3")
            await page.fill("#clip-seconds", "1")
            await page.click("#start")
            await page.wait_for_function(
                "Number(document.querySelector('#analysis-count').dataset.count) >= 4",
                timeout=30_000,
            )
            await page.click("#generate")
            await page.wait_for_selector("#clips li[data-status=done]", timeout=30_000)
            played = (
                "Number(document.querySelector('#remote-played').dataset.samples) > 0"
                if mode == "webrtc"
                else "[...document.querySelectorAll('#clips li')].some(li => li.dataset.played > 0)"
            )
            await page.wait_for_function(played, timeout=30_000)
            # Every finished clip can be played and downloaded in the page, in both modes.
            await page.wait_for_selector("#clips li[data-status=done] a[download]", timeout=30_000)
            # Let the fake microphone reach the end of the speech before stopping.
            await page.wait_for_function(
                "Number(document.querySelector('#sent').dataset.samples) / "
                "Number(document.querySelector('#sent').dataset.rate) > 6.5",
                timeout=30_000,
            )
            shot = await page.screenshot(full_page=True)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / f"browser-{mode}.png").write_bytes(shot)
            if os.environ.get("GRYM_UPDATE_SCREENSHOTS"):
                (ROOT / "docs" / f"browser-{mode}.png").write_bytes(shot)
            inbound = await page.evaluate(INBOUND_STATS) if mode == "webrtc" else None
            await page.click("#stop")
            await page.wait_for_selector("#summary[data-samples-received]", timeout=30_000)
            probe = await page.evaluate("window.__probe ? {sent: __probe.sent, events: "
                                        "__probe.events} : null")  # fmt: skip
            underruns = int(await page.text_content("#underruns") or "0")

            sent = await page.eval_on_selector("#sent", "e => [e.dataset.samples, e.dataset.rate]")
            received = int(await page.get_attribute("#summary", "data-samples-received"))
            ready = await page.text_content("#status")
            transcript = await page.text_content("#transcript") or ""
            partial = await page.text_content("#partial") or ""
            # Each word of a final shows its times on hover.
            times = await page.eval_on_selector_all(
                "#transcript .word", "ws => ws.map(w => w.title)"
            )
            notices = await page.text_content("#notices") or ""
        finally:
            await browser.close()
    assert not errors, errors
    # The page's player never ran dry in the middle of a generated clip.
    assert underruns == 0
    sent_samples, rate = int(sent[0]), int(sent[1])
    if mode == "websocket":
        # PCM over TCP at the page's own rate: every sample counted, exactly.
        assert received == sent_samples
    else:
        # Opus over UDP at 48 kHz: the same audio time, within a few frames.
        assert abs(received / 48000 - sent_samples / rate) < 0.2
        # Recorded, not asserted (timings are not tests): browser-to-event latency, and how the
        # browser's own jitter buffer fared with the generated audio coming back.
        record = {**browser_to_event(probe, received), "inbound_audio": inbound}
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "browser-webrtc-latency.json").write_text(json.dumps(record, indent=1))
        print("browser-to-event latency over WebRTC:", record)
        assert record["latency_ms"], probe["events"]
    assert "Demo generator" in notices and "Demo analysis model" in notices
    assert "live" in ready or "stopped" in ready
    reference = " ".join(SENTENCES)
    heard = f"{transcript} {partial}"
    assert word_recall(reference, heard) >= 0.5, (reference, heard)
    assert times and all(re.fullmatch(r"\d+\.\d\d–\d+\.\d\d s", t) for t in times), times


async def test_the_page_says_what_is_wrong(mic_wav: Path) -> None:
    from playwright.async_api import async_playwright

    with run_server(token="s3cret", analysis_model="tiny-random") as server:
        async with async_playwright() as p:
            allowed = chromium_args(mic_wav)
            denied = [a for a in allowed if a != "--use-fake-ui-for-media-stream"]
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=allowed)
            try:
                page = await browser.new_page()
                await page.goto(server.http + "/")
                await page.click("#start")  # no token
                await page.wait_for_selector("#notices p.error", timeout=20_000)
                assert "needs a token" in await page.text_content("#notices")
                assert await page.is_enabled("#start")
            finally:
                await browser.close()
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=denied)
            try:
                # No fake permission prompt, no granted permission: the microphone is refused.
                page = await (await browser.new_context(permissions=[])).new_page()
                await page.goto(server.http + "/")
                await page.click("#start")
                await page.wait_for_selector("#notices p.error", timeout=20_000)
                assert "Microphone access was denied" in await page.text_content("#notices")
            finally:
                await browser.close()


async def test_the_page_plays_a_continuous_stream_without_running_dry(
    page_server: RunningServer, mic_wav: Path
) -> None:
    """Continuous mode in the page: one stream for as long as the session lasts (CONTINUOUS_S,
    GRYM_CONTINUOUS_SECONDS to change it: BENCHMARKS.md quotes a 120 s run), played through the
    page's jitter buffer. What it measured is saved as a test artifact."""
    from playwright.async_api import async_playwright

    seconds = float(os.environ.get("GRYM_CONTINUOUS_SECONDS", CONTINUOUS_S))
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=chromium_args(mic_wav)
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            segments: list[dict[str, Any]] = []

            def on_frame(payload: str | bytes) -> None:
                if isinstance(payload, str) and '"generation.segment"' in payload:
                    event = json.loads(payload)
                    keys = ("ahead_s", "realtime_factor", "timings")
                    segments.append({k: event[k] for k in keys})

            page.on("websocket", lambda ws: ws.on("framereceived", on_frame))
            await page.goto(page_server.http + "/")
            await page.uncheck("#interval")
            await page.check("#continuous")
            await page.fill("#clip-seconds", "2")
            await page.click("#start")
            stream = "#clips li[data-id='1']"
            await page.wait_for_function(
                f'Number(document.querySelector("{stream}")?.dataset.played || 0) '
                f"/ {48000} >= {seconds}",
                timeout=(seconds + 60) * 1000,
            )
            segment = await page.text_content(f"{stream} .clip-body") or ""
            await page.click("#stop")
            await page.wait_for_selector(f"{stream}[data-status=done]", timeout=30_000)
            underruns = int(await page.text_content("#underruns") or "0")
            played = int(await page.get_attribute(stream, "data-played") or "0")
            rate = await page.evaluate("document.querySelector('#sent').dataset.rate")
            head = await page.text_content(f"{stream} .clip-head") or ""
            done = await page.text_content(f"{stream} .clip-body") or ""
        finally:
            await browser.close()
    record = {"seconds_played": played / int(rate), "underruns": underruns, "last_segment": segment,
              "done": done, "segments": segments}  # fmt: skip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "browser-continuous.json").write_text(json.dumps(record, indent=1))
    print("continuous stream in the page:", record)
    assert not errors, errors
    assert "continuous, 2 s segments" in head and "real time" in segment, (head, segment)
    assert underruns == 0
    assert played / int(rate) >= seconds and done.startswith("done:"), done
