// The two ways a page talks to the server, behind one shape:
//   const link = await openWebSocket(options) | await openWebRtc(options)
//   link.sendControl(message); await link.stop(); link.close()
// options: {config, token, ctx (AudioContext), stream (microphone MediaStream), onEvent(event),
//           onAudio(header, Float32Array), onLevel(rms), onSent(samples)}
// Events reach onEvent with `client_time` (performance.now()) and, for analysis over a
// WebSocket, `client_latency_ms` measured like the Python client's.

const HEADER_BYTES = 28;

export class ServerError extends Error {
  constructor(event) {
    super(`${event.code}: ${event.message}`);
    this.event = event;
  }
}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/stream`;
}

// A generated-audio frame: 28-byte header (docs/protocol.md section 9), then mono PCM.
export function parseAudioFrame(buffer) {
  const view = new DataView(buffer);
  const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
  if (magic !== "GRYA") throw new Error("not a generated-audio frame");
  const header = {
    encoding: view.getUint8(5) === 1 ? "pcm_s16le" : "pcm_f32le",
    last: (view.getUint16(6, true) & 1) === 1,
    id: view.getUint32(8, true),
    index: view.getUint32(12, true),
    sampleRate: view.getUint32(16, true),
    start: Number(view.getBigUint64(20, true)),
  };
  let samples;
  if (header.encoding === "pcm_f32le") {
    samples = new Float32Array(buffer.slice(HEADER_BYTES));
  } else {
    const ints = new Int16Array(buffer.slice(HEADER_BYTES));
    samples = Float32Array.from(ints, (v) => v / 32768);
  }
  return { header, samples };
}

async function captureNode(ctx, stream, channels, onFrame) {
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "grym-capture", {
    numberOfInputs: 1,
    numberOfOutputs: 0,
    channelCount: channels,
    channelCountMode: "explicit",
    processorOptions: { channels },
  });
  node.port.onmessage = (e) => onFrame(e.data.pcm, e.data.rms);
  source.connect(node);
  return () => {
    node.port.onmessage = null;
    source.disconnect();
    node.disconnect();
  };
}

export async function openWebSocket(o) {
  const ws = new WebSocket(wsUrl() + (o.token ? `?token=${encodeURIComponent(o.token)}` : ""));
  ws.binaryType = "arraybuffer";
  const channels = Math.min(2, o.stream.getAudioTracks()[0].getSettings().channelCount || 1);
  let sent = 0;
  const sentAt = []; // [samples sent after this frame, performance.now()]
  let stopCapture = null;
  let ended = null;
  const done = new Promise((resolve) => (ended = resolve));
  const ready = new Promise((resolve, reject) => {
    ws.onopen = () => {
      ws.send(JSON.stringify({
        type: "start", sample_rate: o.ctx.sampleRate, channels, encoding: "pcm_f32le",
        config: o.config, token: o.token || undefined,
      }));
    };
    ws.onerror = () => reject(new Error("the server is unreachable (WebSocket failed)"));
    ws.onclose = (e) => {
      reject(new Error(`the connection closed before the session started (${e.code})`));
      ended(e.code);
      if (o.onClosed) o.onClosed(e.code, e.reason);
    };
    ws.onmessage = (e) => {
      if (typeof e.data !== "string") {
        const { header, samples } = parseAudioFrame(e.data);
        o.onAudio(header, samples);
        return;
      }
      const event = JSON.parse(e.data);
      event.client_time = performance.now();
      if (event.type === "ready") resolve(event);
      if (event.type === "error" && event.fatal && !event.session) reject(new ServerError(event));
      if (event.type === "analysis") event.client_latency_ms = latency(event.end);
      o.onEvent(event);
    };
  });

  function latency(endSeconds) {
    const last = Math.round(endSeconds * o.ctx.sampleRate);
    const hit = sentAt.find(([samples]) => samples >= last) || sentAt[sentAt.length - 1];
    return hit ? performance.now() - hit[1] : null;
  }

  const readyEvent = await ready;
  stopCapture = await captureNode(o.ctx, o.stream, channels, (pcm, rms) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    ws.send(pcm.buffer);
    sent += pcm.length / channels;
    sentAt.push([sent, performance.now()]);
    if (sentAt.length > 3000) sentAt.splice(0, 1000);
    o.onLevel(rms);
    o.onSent(sent, o.ctx.sampleRate);
  });
  return {
    ready: readyEvent,
    kind: "websocket",
    sendControl: (message) => ws.send(JSON.stringify(message)),
    async stop() {
      stopCapture();
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "stop" }));
      await done;
    },
    close: () => {
      if (stopCapture) stopCapture();
      ws.close();
    },
  };
}

export async function openWebRtc(o) {
  const pc = new RTCPeerConnection({ iceServers: o.iceServers || [] });
  const track = o.stream.getAudioTracks()[0];
  const sender = pc.addTrack(track, o.stream);
  const channel = pc.createDataChannel("events");
  let ended = null;
  const done = new Promise((resolve) => (ended = resolve));
  let readyResolve = null;
  const ready = new Promise((resolve) => (readyResolve = resolve));
  channel.onmessage = (e) => {
    const event = JSON.parse(e.data);
    event.client_time = performance.now();
    if (event.type === "ready") readyResolve(event);
    o.onEvent(event);
    if (event.type === "end" || (event.type === "error" && event.fatal)) ended(event);
  };
  pc.ontrack = (e) => o.onRemoteStream(e.streams[0] || new MediaStream([e.track]));
  pc.onconnectionstatechange = () => {
    if (["failed", "closed"].includes(pc.connectionState) && o.onClosed) {
      o.onClosed(pc.connectionState, "");
    }
  };
  let stopTap = () => {};

  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc, 5000);
  const response = await fetch("/v1/webrtc/offer", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      type: "offer", sdp: pc.localDescription.sdp, config: o.config,
      token: o.token || undefined,
    }),
  }).catch(() => {
    throw new Error("the server is unreachable (the WebRTC offer got no answer)");
  });
  const answer = await response.json();
  if (answer.type !== "answer") {
    stopTap();
    pc.close();
    throw new ServerError(answer);
  }
  await pc.setRemoteDescription(answer);
  const readyEvent = await Promise.race([
    ready,
    new Promise((_, reject) => setTimeout(
      () => reject(new Error("WebRTC did not connect within 10 s (ICE)")), 10000)),
  ]);
  // Count and meter what the microphone captures from now on, when the connection is up and
  // audio flows (WebRTC itself does not say how much it sent).
  let captured = 0;
  stopTap = await captureNode(o.ctx, o.stream, 1, (pcm, rms) => {
    captured += pcm.length;
    o.onLevel(rms);
    o.onSent(captured, o.ctx.sampleRate);
  });
  return {
    ready: readyEvent,
    kind: "webrtc",
    pc,
    sendControl: (message) => channel.send(JSON.stringify(message)),
    async stop() {
      stopTap();
      await sender.replaceTrack(null); // no more audio; then the server may count it all
      await new Promise((r) => setTimeout(r, 150));
      if (channel.readyState === "open") channel.send(JSON.stringify({ type: "stop" }));
      await done;
      pc.close();
    },
    close: () => {
      stopTap();
      pc.close();
    },
  };
}

function iceGathered(pc, timeoutMs) {
  // The server answers whole offers (no trickle ICE): wait for the candidates.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}
