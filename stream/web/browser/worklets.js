// AudioWorklet processors: capture (microphone -> 20 ms PCM frames) and playback (a jitter
// buffer for generated audio that arrives in chunks). Loaded with audioWorklet.addModule.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.channels = options.processorOptions.channels;
    this.frame = Math.round(sampleRate * 0.02); // 20 ms per message
    this.buffer = new Float32Array(this.frame * this.channels);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const n = input[0].length;
    for (let i = 0; i < n; i++) {
      for (let c = 0; c < this.channels; c++) {
        // A mono input played into a stereo session: repeat it.
        this.buffer[this.filled * this.channels + c] = (input[c] || input[0])[i];
      }
      this.filled++;
      if (this.filled === this.frame) {
        let sum = 0;
        for (let k = 0; k < this.buffer.length; k++) sum += this.buffer[k] * this.buffer[k];
        const rms = Math.sqrt(sum / this.buffer.length);
        this.port.postMessage({ pcm: this.buffer, rms }, [this.buffer.buffer]);
        this.buffer = new Float32Array(this.frame * this.channels);
        this.filled = 0;
      }
    }
    return true;
  }
}

// Plays pushed chunks back to back. A clip starts once PREBUFFER seconds of it (or all of it)
// are queued, so network jitter between chunks does not become gaps; underruns are counted.
const PREBUFFER = 0.15;

class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = []; // {id, data, offset}
    this.queued = 0;
    this.playing = false;
    this.lastDone = new Set();
    this.played = {}; // generation id -> samples played
    this.underruns = 0;
    this.sinceReport = 0;
    this.port.onmessage = (e) => {
      const m = e.data;
      if (m.type === "push") {
        this.queue.push({ id: m.id, data: m.samples, offset: 0 });
        this.queued += m.samples.length;
        if (m.last) this.lastDone.add(m.id);
      } else if (m.type === "clear") {
        this.queue = [];
        this.queued = 0;
        this.playing = false;
      }
    };
  }

  process(_inputs, outputs) {
    const out = outputs[0];
    const n = out[0].length;
    const head = this.queue[0];
    if (!this.playing && head) {
      this.playing = this.queued >= PREBUFFER * sampleRate || this.lastDone.has(head.id);
    }
    let written = 0;
    while (this.playing && written < n && this.queue.length) {
      const item = this.queue[0];
      const take = Math.min(n - written, item.data.length - item.offset);
      for (let c = 0; c < out.length; c++) {
        out[c].set(item.data.subarray(item.offset, item.offset + take), written);
      }
      item.offset += take;
      written += take;
      this.queued -= take;
      this.current = item.id;
      this.played[item.id] = (this.played[item.id] || 0) + take;
      if (item.offset === item.data.length) this.queue.shift();
    }
    if (this.playing && written < n && this.queue.length === 0) {
      // Out of audio: the end of a clip, or an underrun when more of it is still to come.
      if (!this.lastDone.has(this.current)) this.underruns++;
      this.playing = false; // the next audio waits for the prebuffer again
    }
    for (let c = 0; c < out.length; c++) out[c].fill(0, written);
    this.sinceReport += n;
    if (this.sinceReport >= sampleRate / 10) {
      this.sinceReport = 0;
      this.port.postMessage({ played: this.played, underruns: this.underruns });
    }
    return true;
  }
}

registerProcessor("grym-capture", CaptureProcessor);
registerProcessor("grym-player", PlayerProcessor);
