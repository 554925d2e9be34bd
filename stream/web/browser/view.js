// What the page shows: a scrolling timeline of the analysis, the transcript, the clips.
// Plain DOM and one canvas; everything is fed by events (app.js).

const SECONDS_SHOWN = 30;

export class Timeline {
  constructor(canvas) {
    this.canvas = canvas;
    this.rows = []; // {start, end, rms, speech, label}
    this.markers = []; // {at, id, reason}
    this.now = 0;
  }

  addAnalysis(event) {
    const f = event.features || {};
    const label = (event.wav2vec2 && event.wav2vec2.labels && event.wav2vec2.labels[0]) || null;
    this.rows.push({
      start: event.start, end: event.end, rms: f.rms_dbfs ?? -120,
      speech: event.vad ? event.vad.speech : null, label: label ? label.label : null,
      text: event.transcript ? event.transcript.text : "",
    });
    this.now = Math.max(this.now, event.end);
    this.draw();
  }

  addMarker(at, id, reason) {
    this.markers.push({ at, id, reason });
    this.draw();
  }

  draw() {
    const { canvas } = this;
    const ctx = canvas.getContext("2d");
    const w = (canvas.width = canvas.clientWidth * devicePixelRatio);
    const h = (canvas.height = canvas.clientHeight * devicePixelRatio);
    const t0 = Math.max(0, this.now - SECONDS_SHOWN);
    const x = (t) => ((t - t0) / SECONDS_SHOWN) * w;
    const y = (db) => h - ((Math.max(-80, Math.min(0, db)) + 80) / 80) * (h * 0.8) - h * 0.1;
    ctx.clearRect(0, 0, w, h);
    ctx.font = `${11 * devicePixelRatio}px system-ui`;
    for (const r of this.rows) {
      if (r.end < t0) continue;
      if (r.speech) {
        ctx.fillStyle = "rgba(60, 140, 220, 0.18)"; // voice activity
        ctx.fillRect(x(r.start), 0, x(r.end) - x(r.start), h);
      }
      ctx.fillStyle = "#2b6";
      ctx.fillRect(x(r.start) + 1, y(r.rms), x(r.end) - x(r.start) - 2, h - y(r.rms));
      const words = r.text ? r.text.trim() : r.label;
      if (words) {
        ctx.fillStyle = r.text ? "#222" : "#555";
        fitText(ctx, words, x(r.start) + 3, 14 * devicePixelRatio, x(r.end) - x(r.start) - 6);
      }
    }
    for (const m of this.markers) {
      if (m.at < t0) continue;
      ctx.strokeStyle = "#c33";
      ctx.lineWidth = 2 * devicePixelRatio;
      ctx.beginPath();
      ctx.moveTo(x(m.at), 0);
      ctx.lineTo(x(m.at), h);
      ctx.stroke();
      ctx.fillStyle = "#c33";
      ctx.fillText(`#${m.id} ${m.reason}`, x(m.at) + 3, h - 6 * devicePixelRatio);
    }
  }
}

function fitText(ctx, text, x, y, width) {
  // A chunk's words, cut to its width on the timeline.
  let shown = text;
  while (shown && ctx.measureText(shown).width > width) shown = shown.slice(0, -1);
  if (shown) ctx.fillText(shown, x, y);
}

export function wavBlob(samples, rate) {
  // 32-bit float WAV: what was sent, bit for bit.
  const bytes = samples.length * 4;
  const buffer = new ArrayBuffer(44 + bytes);
  const v = new DataView(buffer);
  const text = (o, s) => [...s].forEach((c, i) => v.setUint8(o + i, c.charCodeAt(0)));
  text(0, "RIFF"); v.setUint32(4, 36 + bytes, true); text(8, "WAVE");
  text(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 3, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 4, true); v.setUint16(32, 4, true);
  v.setUint16(34, 32, true); text(36, "data"); v.setUint32(40, bytes, true);
  new Float32Array(buffer, 44).set(samples);
  return new Blob([buffer], { type: "audio/wav" });
}

const STREAM_KEPT_S = 60;

export class Clips {
  // fetchClip(id) -> Promise<Blob>: a clip's WAV from the server, for clips whose audio came on
  // a WebRTC track rather than in frames to the page.
  constructor(list, fetchClip) {
    this.list = list;
    this.fetchClip = fetchClip;
    this.items = new Map(); // id -> {li, chunks, rate}
  }

  upsert(event) {
    let item = this.items.get(event.id);
    if (!item) {
      const li = document.createElement("li");
      li.dataset.id = event.id;
      li.innerHTML = `<div class="clip-head"></div><div class="clip-prompt"></div>
        <div class="clip-body"></div>`;
      this.list.prepend(li);
      item = { li, chunks: [], rate: 0, played: 0 };
      this.items.set(event.id, item);
    }
    const kind = event.type.replace("generation.", "");
    item.li.dataset.status = kind;
    if (event.mode === "continuous") item.stream = true;
    if (event.sample_rate) item.sampleRate = event.sample_rate;
    if (event.trigger) {
      const t = event.trigger;
      const length = item.stream ? `continuous, ${event.seconds} s segments` : `${event.seconds} s`;
      item.li.querySelector(".clip-head").textContent =
        `#${event.id} · ${t.reason} at ${t.at.toFixed(1)} s · seed ${event.seed} · ${length}`;
    }
    // A stream's segments each bring the prompt they were made from: it follows the room.
    if (event.prompt) item.li.querySelector(".clip-prompt").textContent = event.prompt.text;
    const body = item.li.querySelector(".clip-body");
    if (kind === "progress") body.textContent = `step ${event.step}/${event.steps}`;
    if (kind === "segment") {
      const made = (event.start + event.samples) / item.sampleRate;
      body.textContent = `segment ${event.segment + 1} · ${made.toFixed(1)} s made · ` +
        `${event.realtime_factor}x real time`;
    }
    if (kind === "behind" || kind === "recovered") {
      body.textContent = `${kind} (${event.realtime_factor}x real time): ${event.change} ` +
        `-> ${event.steps} steps, hop ${event.hop_seconds} s`;
    }
    if (kind === "cancelled") body.textContent = `cancelled (${event.reason})`;
    if (kind === "retrying") body.textContent = `retrying (attempt ${event.attempt}): ${event.code}`;
    if (kind === "failed") body.textContent = `failed: ${event.code}: ${event.message}`;
    if (kind === "done") this.finish(item, event);
    return item;
  }

  addAudio(header, samples) {
    const item = this.items.get(header.id);
    if (!item) return;
    item.chunks.push(samples);
    item.rate = header.sampleRate;
    if (item.stream) {
      // An endless stream keeps its last STREAM_KEPT_S for the download, not everything.
      item.kept = (item.kept || 0) + samples.length;
      while (item.kept - item.chunks[0].length > STREAM_KEPT_S * item.rate) {
        item.kept -= item.chunks.shift().length;
      }
    }
  }

  setPlayed(id, samples) {
    const item = this.items.get(Number(id));
    if (item) item.li.dataset.played = samples;
  }

  finish(item, event) {
    const body = item.li.querySelector(".clip-body");
    const t = event.timings || {};
    body.textContent = `done: ${(event.samples / event.sample_rate).toFixed(2)} s, ` + (item.stream
      ? `${event.segments} segments`
      : `first audio after ${(t.first_audio_after_submit_s ?? 0).toFixed(2)} s`);
    if (!item.chunks.length && item.stream) return; // a stream is not kept by the server
    if (!item.chunks.length) {
      // WebRTC: the audio came on the track as it played; the server keeps the clip for a
      // while: fetch it now, while the session is live.
      this.fetchClip(event.id).then((blob) => this.attach(item, event, URL.createObjectURL(blob)))
        .catch((err) => body.append(` (no download: ${err.message})`));
      return;
    }
    const total = item.chunks.reduce((n, c) => n + c.length, 0);
    const all = new Float32Array(total);
    let at = 0;
    for (const c of item.chunks) {
      all.set(c, at);
      at += c.length;
    }
    this.attach(item, event, URL.createObjectURL(wavBlob(all, item.rate)));
  }

  attach(item, event, url) {
    const body = item.li.querySelector(".clip-body");
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.src = url;
    const link = document.createElement("a");
    link.href = url;
    link.download = `generation-${event.id}.wav`;
    link.textContent = "download WAV";
    body.append(" ", audio, " ", link);
  }
}
