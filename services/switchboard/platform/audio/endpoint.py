"""Has the speaker finished? Smart Turn v3.2 on the audio of a turn, with onnxruntime.

Smart Turn (Pipecat's open model, BSD-2; decisions.md entry 60) reads the last
8 s of a turn as Whisper's log-mel features (``melspec.py``) and gives the
probability that the speaker has finished, from the sound alone: intonation,
a word cut short, a breath before more. Its file comes out of the ``pipecat-ai``
wheel at install time (``scripts/install-tools.sh`` puts it in
``.tools/models``); nothing is fetched while serving.

One model per process, on the CPU with one thread (``SmartTurn``): it is
loaded on first use and run on its own single-thread executor, never on the
event loop, so sessions that pause at once queue for it (a reading costs tens
of milliseconds) rather than take both cores from the loop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from switchboard.platform.audio import pcm

log = logging.getLogger("switchboard.platform.audio.endpoint")

#: The file the install step extracts (scripts/install-tools.sh checks its hash).
SMART_TURN_FILE: Final = "smart-turn-v3.2-cpu.onnx"
#: The window the model reads: the turn's last 8 s at 16 kHz, zeros before a shorter one.
WINDOW_S: Final = 8


class Model:
    """The loaded model; ``probability`` blocks (tens of milliseconds of one core)."""

    def __init__(self, path: Path) -> None:
        # Imported here: a server that never reads a turn does not load onnxruntime.
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        # The model is int8. On x86 without AVX-512 VNNI, onnxruntime's u8s8 products
        # saturate at 16 bits, and the judgments were other than the model's: eSpeak's
        # "my phone number is" read 0.58 finished on an AVX2 host and under 0.3 on a VNNI
        # one. Wider sums make every host read what the model says, at no measured cost
        # here (bench/turns.py: 107 ms p50 per reading with it, 113 ms without).
        options.add_session_config_entry("session.x64quantprecision", "1")
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def probability(self, audio: bytes, rate: int) -> float:
        """The probability that ``audio`` (mono PCM16 at ``rate``) ends a finished turn."""
        # Imported with the model, as onnxruntime is: numpy is only the features' algebra.
        import numpy as np

        from switchboard.platform.audio import melspec

        window = WINDOW_S * melspec.RATE
        if rate != melspec.RATE:
            audio = pcm.resample(audio, rate, melspec.RATE)
        samples = melspec.from_pcm16(audio[-window * pcm.SAMPLE_BYTES :])
        if len(samples) < window:
            samples = np.concatenate([np.zeros(window - len(samples), np.float32), samples])
        features = melspec.log_mel(samples)[None, :, :]
        out = self._session.run(None, {self._input: features})[0]
        return float(np.asarray(out).reshape(-1)[0])


class SmartTurn:
    """The process's end-of-turn model, from ``folder``: loaded on first use, run off
    the event loop. ``available`` is False (said once in the log) when its file is
    missing or did not load; sessions then end turns on silence alone."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / SMART_TURN_FILE
        self.available = self.path.is_file()
        if not self.available:
            log.warning(
                "no end-of-turn model at %s (scripts/install-tools.sh installs it): voice "
                "turns end on silence alone",
                self.path,
            )
        self._model: Model | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smart-turn")

    async def probability(self, audio: bytes, rate: int) -> float | None:
        """The probability that the speaker of ``audio`` has finished; None without a model."""
        if not self.available:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read, audio, rate)

    def _read(self, audio: bytes, rate: int) -> float | None:
        # On the executor's one thread: loads are never concurrent.
        if self._model is None:
            if not self.available:
                return None
            try:
                self._model = Model(self.path)
            # onnxruntime's errors (NoSuchFile, InvalidProtobuf, ...) derive from Exception
            # alone; any of them means no model, not a failed session.
            except Exception as exc:  # noqa: BLE001
                self.available = False
                log.warning(
                    "the end-of-turn model at %s did not load (%s): voice turns end on "
                    "silence alone",
                    self.path,
                    exc,
                )
                return None
        return self._model.probability(audio, rate)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
