// The page's controller: capture, connect (WebSocket or WebRTC), show the events, play clips.

import { openWebRtc, openWebSocket, ServerError } from "./transport.js";
import { Clips, Timeline } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), mode: $("mode"), device: $("device"), start: $("start"), stop: $("stop"),
  notices: $("notices"), meter: $("meter-fill"), sent: $("sent"), count: $("analysis-count"),
  latency: $("latency"), transcript: $("transcript"), partial: $("partial"), rows: $("rows"),
  summary: $("summary"), generate: $("generate"), prompt: $("prompt"), token: $("token"),
  interval: $("interval"), every: $("every"), novelty: $("novelty"), afterSpeech: $("after-speech"),
  clipSeconds: $("clip-seconds"), models: $("models"), continuous: $("continuous"),
};
const timeline = new Timeline($("timeline"));
const clips = new Clips($("clips"), async (id) => {
  const session = link && link.ready ? link.ready.session : null;
  const token = ui.token.value ? `?token=${encodeURIComponent(ui.token.value)}` : "";
  const response = await fetch(`/v1/sessions/${session}/generations/${id}.wav${token}`);
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  const blob = await response.blob();
  clipsFetched += 1;
  $("clips").dataset.fetched = clipsFetched;
  return blob;
});
let clipsFetched = 0;
let ctx = null;
let player = null;
let link = null;
let stream = null;
let analysed = 0;
const latencies = [];

function setStatus(text, kind = "") {
  ui.status.textContent = text;
  ui.status.className = `pill ${kind}`;
}

function notice(text, kind = "error", key = text) {
  if ([...ui.notices.children].some((n) => n.dataset.key === key)) return;
  const p = document.createElement("p");
  p.className = kind;
  p.dataset.key = key;
  p.textContent = text;
  ui.notices.append(p);
}

function explain(err) {
  if (err instanceof ServerError) {
    const e = err.event;
    if (e.code === "unauthorized") return "The server needs a token: enter it above and start again.";
    if (e.code === "server_busy") return "The server is full (all sessions in use): try again later.";
    return `The server refused the session: ${e.code}: ${e.message}`;
  }
  if (err && err.name === "NotAllowedError") {
    return "Microphone access was denied: allow it for this page (the lock icon in the address bar).";
  }
  if (err && err.name === "NotFoundError") return "No microphone was found.";
  return String(err && err.message ? err.message : err);
}

function checkSecureContext() {
  if (!window.isSecureContext || !navigator.mediaDevices) {
    notice(
      "This page is not a secure context, so the browser will not give it a microphone. " +
        "Open it as http://localhost:PORT on the server's own machine, or serve it over HTTPS: " +
        "start the server with --tls self-signed (or --tls-cert/--tls-key) and open https://HOST:PORT/.",
      "error", "secure");
    return false;
  }
  return true;
}

async function listDevices() {
  if (!navigator.mediaDevices) return;
  const devices = await navigator.mediaDevices.enumerateDevices();
  const inputs = devices.filter((d) => d.kind === "audioinput");
  const chosen = ui.device.value;
  ui.device.replaceChildren(...inputs.map((d, i) => {
    const o = document.createElement("option");
    o.value = d.deviceId;
    o.textContent = d.label || `microphone ${i + 1}`;
    return o;
  }));
  if (chosen) ui.device.value = chosen;
}

function generationConfig(live = false) {
  const triggers = [];
  if (ui.interval.checked) triggers.push("interval");
  if (ui.novelty.checked) triggers.push("novelty");
  if (ui.afterSpeech.checked) triggers.push("after_speech");
  return {
    triggers,
    interval_seconds: Number(ui.every.value) || 10,
    prompt: ui.prompt.value,
    seconds: Number(ui.clipSeconds.value) || 4,
    // Continuous: segments of that length, each adding half of it, joined without a seam.
    mode: ui.continuous.checked ? "continuous" : "text",
    // Played as it comes, no resampling in the page (fixed for a session: not sent when live).
    ...(live ? {} : { sample_rate: ctx.sampleRate, encoding: "pcm_f32le" }),
  };
}

// Changing triggers, prompt or clip length while live: a `config` message.
const liveControls = [
  ui.interval, ui.every, ui.novelty, ui.afterSpeech, ui.prompt, ui.clipSeconds, ui.continuous,
];
for (const el of liveControls) {
  el.addEventListener("change", () => {
    if (link) link.sendControl({ type: "config", generation: generationConfig(true) });
  });
}

async function showRoundTrip() {
  // WebRTC: the ICE candidate pair's measured round trip (a WebSocket page has none to read).
  if (!link || !link.pc) return;
  const stats = await link.pc.getStats();
  stats.forEach((r) => {
    if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime != null) {
      $("rtt").textContent = `${(r.currentRoundTripTime * 1000).toFixed(1)} ms`;
    }
  });
  setTimeout(showRoundTrip, 1000);
}

function onEvent(event) {
  switch (event.type) {
    case "ready": return onReady(event);
    case "analysis": return onAnalysis(event);
    case "error":
      notice(`${event.code}: ${event.message}`, event.fatal ? "error" : "warning",
        `${event.code}${Date.now()}`);
      return;
    case "end":
      ui.summary.dataset.samplesReceived = event.samples_received;
      ui.summary.textContent = `Session ended: ${event.seconds.toFixed(2)} s received ` +
        `(${event.samples_received} samples), ${event.chunks} chunks analysed, ` +
        `${event.skipped} skipped.`;
      if (event.transcript && event.transcript.final) addFinal(event.transcript.final);
      return;
    default:
      if (event.type.startsWith("generation.")) onGeneration(event);
  }
}

function onReady(event) {
  setStatus(`live · ${link ? link.kind : ""} · session ${event.session}`, "live");
  const parts = Object.entries(event.models || {}).map(([name, m]) =>
    `${name}: ${m.model}${m.trained ? "" : " (untrained)"}`);
  if (event.generator) parts.push(`generator: ${event.generator.model}` +
    (event.generator.trained ? "" : " (untrained)"));
  ui.models.textContent = parts.join(" · ");
  const demo = Object.values(event.models || {}).filter((m) => m.note || !m.trained);
  for (const m of demo) notice(`Demo analysis model: ${m.note || "random weights"}`, "warning");
  if (event.generator && !event.generator.trained) {
    notice(`Demo generator: ${event.generator.note || "random weights"}`, "warning");
  }
}

function onAnalysis(event) {
  analysed += 1;
  ui.count.textContent = analysed;
  ui.count.dataset.count = analysed;
  timeline.addAnalysis(event);
  if (event.client_latency_ms != null) latencies.push(event.client_latency_ms);
  const p50 = latencies.length ? [...latencies].sort((a, b) => a - b)[latencies.length >> 1] : null;
  ui.latency.textContent = `server ${event.latency_ms?.toFixed(1) ?? "-"} ms` +
    (p50 != null ? ` · end-to-end p50 ${p50.toFixed(0)} ms` : "");
  const t = event.transcript;
  if (t) {
    ui.partial.textContent = t.partial;
    if (t.final) addFinal(t.final);
  }
  const f = event.features || {};
  const row = document.createElement("li");
  row.textContent = `${event.start.toFixed(1)}-${event.end.toFixed(1)} s · ` +
    `${(f.rms_dbfs ?? 0).toFixed(1)} dBFS · pitch ${f.pitch_hz ? f.pitch_hz.toFixed(0) + " Hz" : "-"} · ` +
    `speech ${event.vad && event.vad.speech ? "yes" : "no"}` + (t && t.text ? ` · "${t.text.trim()}"` : "");
  ui.rows.prepend(row);
  while (ui.rows.children.length > 40) ui.rows.lastChild.remove();
}

// An utterance's words, each with its times on hover (when the server gave them).
function addFinal(final) {
  if (!final.text) return;
  if (ui.transcript.childNodes.length) ui.transcript.append(" · ");
  const words = final.words && final.words.length ? final.words : [{ word: final.text }];
  words.forEach((w, i) => {
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = w.word;
    if (w.start != null) span.title = `${w.start.toFixed(2)}–${w.end.toFixed(2)} s`;
    ui.transcript.append(...(i ? [" ", span] : [span]));
  });
  ui.partial.textContent = "";
}

function onGeneration(event) {
  clips.upsert(event);
  if (event.type === "generation.queued") {
    timeline.addMarker(event.trigger.at, event.id, event.trigger.reason);
  }
}

function onAudio(header, samples) {
  clips.addAudio(header, samples);
  // Copied to the worklet (not transferred): the clip keeps its samples for the WAV download.
  player.port.postMessage({ type: "push", id: header.id, samples, last: header.last });
}

function onRemoteStream(remote) {
  // Browsers play a remote WebRTC stream only through a media element.
  const el = $("remote");
  el.srcObject = remote;
  el.play().catch(() => notice("Click the page to allow playback of generated audio.", "warning"));
  const source = ctx.createMediaStreamSource(remote);
  const meter = ctx.createAnalyser();
  source.connect(meter);
  const data = new Float32Array(meter.fftSize);
  let played = 0;
  const track = remote.getAudioTracks()[0];
  const tick = () => {
    if (!track || track.readyState !== "live") return;
    meter.getFloatTimeDomainData(data);
    if (data.some((v) => Math.abs(v) > 1e-3)) played += data.length;
    $("remote-played").dataset.samples = played;
    $("remote-played").textContent = `${(played / ctx.sampleRate).toFixed(1)} s of generated audio played`;
    setTimeout(tick, (data.length / ctx.sampleRate) * 1000);
  };
  tick();
}

async function start() {
  if (!checkSecureContext()) return;
  ui.start.disabled = true;
  ui.notices.replaceChildren();
  setStatus("starting…");
  try {
    ctx = ctx || new AudioContext();
    await ctx.resume();
    if (!player) {
      await ctx.audioWorklet.addModule("worklets.js");
      player = new AudioWorkletNode(ctx, "grym-player", { outputChannelCount: [2] });
      player.connect(ctx.destination);
      player.port.onmessage = (e) => {
        for (const [id, n] of Object.entries(e.data.played)) clips.setPlayed(id, n);
        $("underruns").textContent = e.data.underruns;
      };
    }
    stream = await navigator.mediaDevices.getUserMedia({
      audio: {
        deviceId: ui.device.value ? { exact: ui.device.value } : undefined,
        // The analysis wants the sound as it is: no voice processing.
        echoCancellation: false, noiseSuppression: false, autoGainControl: false,
      },
    });
    await listDevices();
    const options = {
      config: { generation: generationConfig() }, token: ui.token.value, ctx, stream,
      onEvent, onAudio, onRemoteStream, onClosed,
      onLevel: (rms) => (ui.meter.style.width = `${Math.min(100, Math.max(0, (20 * Math.log10(rms + 1e-9) + 60) * 100 / 60))}%`),
      onSent: (samples, rate) => {
        ui.sent.dataset.samples = samples;
        ui.sent.dataset.rate = rate;
        ui.sent.textContent = `${(samples / rate).toFixed(1)} s sent`;
      },
    };
    analysed = 0;
    link = ui.mode.value === "webrtc" ? await openWebRtc(options) : await openWebSocket(options);
    onReady(link.ready);
    showRoundTrip();
    ui.stop.disabled = false;
    ui.generate.disabled = false;
  } catch (err) {
    setStatus("not connected", "error");
    notice(explain(err));
    if (stream) stream.getTracks().forEach((t) => t.stop());
    link = null;
    ui.start.disabled = false;
  }
}

function onClosed(code, reason) {
  // The connection ended without the user pressing Stop (server gone, network, fatal error).
  if (!link || stopping) return;
  notice(`The connection closed (${code}${reason ? ": " + reason : ""}).`, "error", "closed");
  stream.getTracks().forEach((t) => t.stop());
  link.close();
  link = null;
  setStatus("disconnected", "error");
  ui.start.disabled = false;
  ui.stop.disabled = true;
  ui.generate.disabled = true;
}

let stopping = false;

async function stop() {
  stopping = true;
  ui.stop.disabled = true;
  ui.generate.disabled = true;
  setStatus("finishing…");
  try {
    await link.stop();
  } finally {
    stream.getTracks().forEach((t) => t.stop());
    link = null;
    stopping = false;
    setStatus("stopped");
    ui.start.disabled = false;
  }
}

ui.start.onclick = start;
ui.stop.onclick = stop;
ui.generate.onclick = () => {
  if (!link) return;
  link.sendControl({
    type: "generate", prompt: ui.prompt.value, seconds: Number(ui.clipSeconds.value) || 4,
    mode: ui.continuous.checked ? "continuous" : "text",
  });
};
checkSecureContext();
listDevices();
fetch("/healthz").then((r) => r.json()).then((h) => {
  $("server").textContent = `server ${h.version} · ${h.sessions}/${h.max_sessions} sessions`;
}).catch(() => notice("The server does not answer /healthz: is it running?"));
