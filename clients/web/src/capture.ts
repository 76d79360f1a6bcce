// The microphone's AudioWorklet (built on its own into capture.js: a worklet is loaded
// from a URL of the page's origin, which is all the CSP lets a script come from). It hands
// the first channel's samples to the page in blocks of BLOCK frames, off the audio thread's
// 128-frame quantum, and outputs silence.

// A module, so these declarations stay in this file.
export {};

// The worklet scope's globals (TypeScript's DOM library describes the page's, not these).
declare class AudioWorkletProcessor {
  readonly port: MessagePort;
}
declare function registerProcessor(name: string, processor: new () => AudioWorkletProcessor): void;

/** Frames a message carries: ~43 ms at 48 kHz, so the page hears a few dozen a second. */
const BLOCK = 2048;

class Capture extends AudioWorkletProcessor {
  private block = new Float32Array(BLOCK);
  private filled = 0;
  private stopped = false;

  constructor() {
    super();
    this.port.onmessage = () => {
      // "stop": what is held goes now, marked as the last, and the node does nothing more.
      this.stopped = true;
      const last = this.block.slice(0, this.filled);
      this.filled = 0;
      this.port.postMessage({ last }, [last.buffer]);
    };
  }

  process(inputs: Float32Array[][]): boolean {
    if (this.stopped) return false;
    const channel = inputs[0]?.[0];
    if (channel === undefined) return true;
    let at = 0;
    while (at < channel.length) {
      const take = Math.min(channel.length - at, BLOCK - this.filled);
      this.block.set(channel.subarray(at, at + take), this.filled);
      this.filled += take;
      at += take;
      if (this.filled === BLOCK) this.flush();
    }
    return true;
  }

  private flush(): void {
    if (this.filled === 0) return;
    const full = this.filled === BLOCK ? this.block : this.block.slice(0, this.filled);
    // The buffer moves to the page rather than being copied; a new one takes its place.
    this.port.postMessage(full, [full.buffer]);
    this.block = new Float32Array(BLOCK);
    this.filled = 0;
  }
}

registerProcessor("switchboard-capture", Capture);
