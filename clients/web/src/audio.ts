// Audio as numbers, with no browser API: the microphone's samples resampled to the rate the
// server transcribes (16 kHz), written as a WAV of 16-bit PCM, and the speech the server
// sends (16-bit little-endian PCM) read back as samples Web Audio plays.

/** The rate a recording is sent at: what speech recognisers are trained on. */
export const RECORDING_RATE = 16_000;
/** The rate the console asks the answer to be spoken at (the contracts' default). */
export const SPEECH_RATE = 24_000;
/** Taps on each side of a resampled point, in output samples: enough for speech. */
const HALF_TAPS = 16;
/** Points of the kernel's table per input sample (interpolated between). */
const TABLE_RES = 64;

/** `input` (mono, at `from` Hz) at `to` Hz: a windowed-sinc low-pass at the lower rate's
 *  Nyquist frequency, so downsampling folds no high frequency into the speech band. The
 *  kernel is tabulated once (a minute at 48 kHz is 140 million taps: no trigonometry in
 *  the loop). */
export function resample(input: Float32Array, from: number, to: number): Float32Array {
  if (from === to) return input.slice();
  const step = from / to;
  const length = Math.floor(input.length / step);
  const output = new Float32Array(length);
  // Cut a little under the lower Nyquist frequency (the window's transition band).
  const cutoff = 0.94 * Math.min(1, to / from);
  const half = Math.ceil(HALF_TAPS * Math.max(1, step));
  const table = new Float32Array(half * TABLE_RES + 2);
  for (let j = 0; j < table.length; j++) {
    const x = Math.min(j / TABLE_RES, half);
    // Blackman window over [-half, half].
    const w = 0.42 + 0.5 * Math.cos((Math.PI * x) / half) + 0.08 * Math.cos((2 * Math.PI * x) / half);
    const t = Math.PI * cutoff * x;
    table[j] = (t === 0 ? 1 : Math.sin(t) / t) * w;
  }
  for (let i = 0; i < length; i++) {
    const centre = i * step;
    const first = Math.max(0, Math.ceil(centre - half));
    const last = Math.min(input.length - 1, Math.floor(centre + half));
    let sum = 0;
    let weight = 0;
    for (let k = first; k <= last; k++) {
      const at = Math.abs(k - centre) * TABLE_RES;
      const j = Math.floor(at);
      const a = table[j] ?? 0;
      const c = a + ((table[j + 1] ?? 0) - a) * (at - j);
      sum += (input[k] ?? 0) * c;
      weight += c;
    }
    // Normalised by the taps' own sum: unit gain, the recording's edges included.
    output[i] = weight === 0 ? 0 : sum / weight;
  }
  return output;
}

/** Samples in [-1, 1] as a WAV file: RIFF, PCM, 16-bit, one channel at `rate`. */
export function wav(samples: Float32Array, rate: number): Blob {
  const bytes = samples.length * 2;
  const buffer = new ArrayBuffer(44 + bytes);
  const view = new DataView(buffer);
  const text = (offset: number, value: string): void => {
    for (let i = 0; i < value.length; i++) view.setUint8(offset + i, value.charCodeAt(i));
  };
  text(0, "RIFF");
  view.setUint32(4, 36 + bytes, true);
  text(8, "WAVE");
  text(12, "fmt ");
  view.setUint32(16, 16, true); // the fmt chunk's size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // one channel
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true); // bytes a second
  view.setUint16(32, 2, true); // bytes a frame
  view.setUint16(34, 16, true); // bits a sample
  text(36, "data");
  view.setUint32(40, bytes, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i] ?? 0));
    view.setInt16(44 + i * 2, s < 0 ? Math.round(s * 0x8000) : Math.round(s * 0x7fff), true);
  }
  return new Blob([buffer], { type: "audio/wav" });
}

/** 16-bit little-endian PCM as samples in [-1, 1); an odd last byte is left out (the
 *  caller carries it to the next piece). */
export function pcm16(bytes: Uint8Array): Float32Array<ArrayBuffer> {
  const count = Math.floor(bytes.length / 2);
  const view = new DataView(bytes.buffer, bytes.byteOffset, count * 2);
  const samples = new Float32Array(count);
  for (let i = 0; i < count; i++) samples[i] = view.getInt16(i * 2, true) / 0x8000;
  return samples;
}

/** The root mean square of `samples` (0 silence, about 0.7 a full-scale sine). */
export function rms(samples: Float32Array): number {
  if (samples.length === 0) return 0;
  let sum = 0;
  for (const s of samples) sum += s * s;
  return Math.sqrt(sum / samples.length);
}

/** Joins the captured blocks into one buffer. */
export function join(blocks: Float32Array[]): Float32Array {
  const total = blocks.reduce((n, b) => n + b.length, 0);
  const out = new Float32Array(total);
  let at = 0;
  for (const b of blocks) {
    out.set(b, at);
    at += b.length;
  }
  return out;
}
