"""Live audio -> utterances. Plain, synchronous and I/O-free: one Segmenter per session.

Frames are 32 ms (512 samples at 16 kHz). Each frame gets a speech probability from a frame VAD:
- `webrtc`: webrtcvad (30 ms of the frame), 1.0 or 0.0;
- `silero`: the Silero VAD v6 ONNX model that faster-whisper ships (stateful per stream);
- `hybrid` (default): an utterance opens only where webrtcvad *and* Silero hear speech; it stays
  open while Silero does. webrtcvad alone never hears the end of speech in background noise
  (see shared/PEERS.md); Silero keeps splitting at ~0.5 s pauses there.

An utterance ends after `trailing_silence_s` of silence; one already `split_after_s` long ends at
its next pause of `split_pause_s` (the rest of the turn is the next utterance) where `may_split()`
allows it, and one with no such pause is cut at `max_utterance_s`.

Times are positions in the stream (seconds of audio fed), so no clock is needed here.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Protocol

import numpy as np

from streamer.config import SAMPLE_RATE, SegmenterConfig

FRAME = 512  # samples per VAD frame (Silero's size at 16 kHz)
FRAME_S = FRAME / SAMPLE_RATE
_SILERO_CONTEXT = 64  # samples of the previous frame Silero v6 prepends


# ---- frame VADs -------------------------------------------------------------------------------
class FrameVad(Protocol):
    def __call__(self, frame: np.ndarray) -> tuple[float, bool]:
        """(speech probability, onset gate) for one float32 frame of FRAME samples."""
        ...


@lru_cache(maxsize=1)
def _silero_session():  # type: ignore[no-untyped-def]
    """One ONNX session for all streams (InferenceSession.run is thread-safe); state is per stream."""
    import onnxruntime
    from faster_whisper.vad import get_assets_path

    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    path = f"{get_assets_path()}/silero_vad_v6.onnx"
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


class SileroVad:
    """Silero VAD v6 run frame by frame with its LSTM state carried across frames."""

    def __init__(self) -> None:
        self.session = _silero_session()
        self.h = np.zeros((1, 1, 128), dtype=np.float32)
        self.c = np.zeros((1, 1, 128), dtype=np.float32)
        self.context = np.zeros((1, _SILERO_CONTEXT), dtype=np.float32)

    def __call__(self, frame: np.ndarray) -> tuple[float, bool]:
        x = np.concatenate([self.context, frame[None, :]], axis=1)  # (1, 576)
        prob, self.h, self.c = self.session.run(None, {"input": x, "h": self.h, "c": self.c})
        self.context = frame[None, -_SILERO_CONTEXT:]
        return float(np.asarray(prob).reshape(-1)[0]), True


class WebRtcVad:
    """webrtcvad on the first 30 ms of each frame (it accepts 10/20/30 ms only)."""

    def __init__(self, aggressiveness: int) -> None:
        import webrtcvad

        self.vad = webrtcvad.Vad(aggressiveness)

    def __call__(self, frame: np.ndarray) -> tuple[float, bool]:
        pcm = (np.clip(frame[:480], -1.0, 1.0) * 32767).astype("<i2").tobytes()
        speech = self.vad.is_speech(pcm, SAMPLE_RATE)
        return (1.0 if speech else 0.0), speech


class HybridVad:
    """Silero's probability, gated at onset by webrtcvad."""

    def __init__(self, aggressiveness: int) -> None:
        self.silero = SileroVad()
        self.webrtc = WebRtcVad(aggressiveness)

    def __call__(self, frame: np.ndarray) -> tuple[float, bool]:
        prob, _ = self.silero(frame)
        _, gate = self.webrtc(frame)
        return prob, gate


def make_vad(config: SegmenterConfig) -> FrameVad:
    if config.vad == "silero":
        return SileroVad()
    if config.vad == "webrtc":
        return WebRtcVad(config.webrtc_aggressiveness)
    return HybridVad(config.webrtc_aggressiveness)


# ---- segmenter output ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeechStarted:
    index: int  # utterance number in this stream, from 0
    start_s: float


@dataclass(frozen=True)
class SpeechPaused:
    """Silence began `early_decode_s` ago: `audio` is what the utterance will be if the silence holds.
    Decoding can start now; a later SpeechResumed means the guess was wrong."""

    index: int
    audio: np.ndarray
    start_s: float
    end_s: float


@dataclass(frozen=True)
class SpeechResumed:
    index: int


@dataclass(frozen=True)
class SpeechEnded:
    index: int
    audio: np.ndarray  # float32, pre-roll + speech + tail pad
    start_s: float
    end_s: float  # end of the last speech frame (what latency is measured from)
    reason: str  # "silence" | "pause" (a short pause in a long utterance) | "max_length" | "end_of_stream"


SegmentEvent = SpeechStarted | SpeechPaused | SpeechResumed | SpeechEnded


class Segmenter:
    """Feed float32 16 kHz mono audio of any chunk size; get utterance events back."""

    def __init__(self, config: SegmenterConfig, vad: FrameVad | None = None) -> None:
        self.config = config
        self.vad = vad if vad is not None else make_vad(config)
        # asked at a pause that would split a long utterance; False: not now (the service says whether
        # it has room for the extra decoding, SessionRunner._room_to_split)
        self.may_split: Callable[[], bool] = lambda: True
        self._pending = np.zeros(0, dtype=np.float32)  # samples not yet a whole frame
        self._frame_no = 0  # frames consumed so far
        pre = math.ceil(config.pre_roll_s / FRAME_S)
        self._recent: deque[tuple[np.ndarray, bool]] = deque(maxlen=pre + config.start_window)
        self._pre_frames = pre
        self._tail_frames = max(1, math.ceil(config.tail_pad_s / FRAME_S))
        self._early_frames = max(self._tail_frames, math.ceil(config.early_decode_s / FRAME_S))
        self._end_frames = max(self._early_frames, math.ceil(config.trailing_silence_s / FRAME_S))
        self._min_frames = math.ceil(config.min_utterance_s / FRAME_S)
        self._max_frames = math.ceil(config.max_utterance_s / FRAME_S)
        self._split_frames = math.ceil(config.split_after_s / FRAME_S)  # 0: no pause splits
        self._pause_frames = max(1, math.ceil(config.split_pause_s / FRAME_S))
        self._next_index = 0
        # open utterance state
        self._frames: list[np.ndarray] | None = None  # None: not in an utterance
        self._start_frame = 0  # stream frame number of self._frames[0]
        self._last_speech = 0  # stream frame number of the last speech frame
        self._silence_run = 0
        self._started = False  # SpeechStarted emitted (speech reached min length)
        self._paused = False  # SpeechPaused emitted for the current silence
        self._continuing = False  # opened by a pause split: its first speech frame starts it

    @property
    def position_s(self) -> float:
        return (self._frame_no * FRAME + len(self._pending)) / SAMPLE_RATE

    @property
    def in_utterance(self) -> bool:
        return self._frames is not None

    @property
    def pausing(self) -> bool:
        """Silence began after started speech: the utterance may end (and want a decoder) soon."""
        return self._frames is not None and self._started and self._silence_run > 0

    def open_audio(self) -> tuple[int, np.ndarray] | None:
        """(index, audio so far) of the utterance being spoken, once it has started; else None."""
        if self._frames is None or not self._started or not self._frames:
            return None
        return self._next_index, np.concatenate(self._frames)

    def feed(self, audio: np.ndarray) -> list[SegmentEvent]:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        buf = np.concatenate([self._pending, audio]) if self._pending.size else audio
        n = len(buf) // FRAME
        self._pending = buf[n * FRAME :].copy()
        events: list[SegmentEvent] = []
        for i in range(n):
            events.extend(self._frame(buf[i * FRAME : (i + 1) * FRAME]))
        return events

    def flush(self, reason: str = "end_of_stream") -> list[SegmentEvent]:
        """End of stream (or a client's Finalize): close the open utterance (never drop the last
        one); audio fed afterwards starts afresh."""
        events: list[SegmentEvent] = []
        if self._frames is not None:
            speech_frames = self._last_speech - self._start_frame + 1
            if self._started or speech_frames - self._pre_frames >= self._min_frames:
                if not self._started:
                    events.append(SpeechStarted(self._next_index, self._start_frame * FRAME_S))
                    self._started = True
                events.append(self._end(reason))
            self._frames = None
        return events

    # ---- internals ----
    def _frame(self, frame: np.ndarray) -> list[SegmentEvent]:
        cfg = self.config
        prob, gate = self.vad(frame)
        no = self._frame_no
        self._frame_no += 1
        onset = gate and prob >= cfg.speech_threshold
        if self._frames is None:
            self._recent.append((frame, onset))
            window = list(self._recent)[-cfg.start_window :]
            if sum(o for _, o in window) < cfg.start_frames:
                return []
            # open: from the first onset frame in the window, minus the pre-roll
            first = next(i for i, (_, o) in enumerate(window) if o)
            back = len(window) - first  # frames from the first onset to now, inclusive
            keep = min(len(self._recent), back + self._pre_frames)
            self._frames = [f for f, _ in list(self._recent)[-keep:]]
            self._start_frame = no - keep + 1
            self._last_speech = no
            self._silence_run = 0
            self._started = self._paused = self._continuing = False
            self._recent.clear()
            return self._check_started()
        self._frames.append(frame)
        events: list[SegmentEvent] = []
        speechy = prob >= cfg.silence_threshold if self._silence_run == 0 else onset
        if speechy:
            if self._paused:
                events.append(SpeechResumed(self._next_index))
                self._paused = False
            self._last_speech = no
            self._silence_run = 0
            events.extend(self._check_started())
            if len(self._frames) >= self._max_frames:
                events.extend(self._split())
            return events
        self._silence_run += 1
        if self._silence_run >= self._end_frames:
            if self._started:
                events.append(self._end("silence"))
            self._frames = None
            self._recent.clear()
        elif self._silence_run == self._pause_frames and self._started and self._long_enough() and self.may_split():
            events.append(self._pause_split(no))
        elif self._silence_run == self._early_frames and self._started and cfg.early_decode:
            audio, start_s, end_s = self._cut()
            events.append(SpeechPaused(self._next_index, audio, start_s, end_s))
            self._paused = True
        elif len(self._frames) >= self._max_frames:
            events.extend(self._split())
        return events

    def _check_started(self) -> list[SegmentEvent]:
        if self._started or self._frames is None:
            return []
        if self._continuing and self._last_speech >= self._start_frame:
            self._started = True  # the rest of a split turn: any speech counts
            return [SpeechStarted(self._next_index, self._start_frame * FRAME_S)]
        if self._last_speech - self._start_frame + 1 - self._pre_frames >= self._min_frames:
            self._started = True
            return [SpeechStarted(self._next_index, self._start_frame * FRAME_S)]
        return []

    def _cut(self) -> tuple[np.ndarray, float, float]:
        assert self._frames is not None
        last = min(len(self._frames), self._last_speech - self._start_frame + 1 + self._tail_frames)
        audio = np.concatenate(self._frames[:last])
        return audio, self._start_frame * FRAME_S, (self._last_speech + 1) * FRAME_S

    def _end(self, reason: str) -> SpeechEnded:
        audio, start_s, end_s = self._cut()
        ev = SpeechEnded(self._next_index, audio, start_s, end_s, reason)
        self._next_index += 1
        self._started = self._paused = self._continuing = False
        return ev

    def _long_enough(self) -> bool:
        return self._split_frames > 0 and self._last_speech - self._start_frame + 1 >= self._split_frames

    def _pause_split(self, no: int) -> SpeechEnded:
        """A long utterance reached a short pause: end it there. The pause so far leads in the next
        part, which starts with the next speech frame; if the silence goes on to the usual wait
        instead, the turn is over and nothing more is emitted."""
        assert self._frames is not None
        ev = self._end("pause")
        run = self._silence_run
        self._frames = self._frames[-run:]
        self._start_frame = no - run + 1
        self._continuing = True
        return ev

    def _split(self) -> list[SegmentEvent]:
        """Max length reached mid-speech: end here and go straight on with a new utterance."""
        assert self._frames is not None
        if not self._started:
            return []
        self._last_speech = self._start_frame + len(self._frames) - 1
        self._frames = self._frames[: self._last_speech - self._start_frame + 1]
        ev = self._end("max_length")
        self._start_frame = self._last_speech + 1
        self._frames = []
        self._silence_run = 0
        self._started = True
        return [ev, SpeechStarted(self._next_index, self._start_frame * FRAME_S)]
