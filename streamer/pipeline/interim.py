"""While someone speaks: interim decodes of a session's open utterances (start flag `interim`) and
the speculative decodes started at a pause, which the utterance's end uses when nobody resumed.

Both only ever use idle capacity or a bounded wait: an interim decode starts when a decoder is idle
(InferenceBackend.interim), a speculative one only when it would start within speculate_max_wait_s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from model import Prediction
from streamer import protocol as P
from streamer.config import SAMPLE_RATE
from streamer.infer.backend import AnalyzeJob, Analysis, Overloaded
from streamer.pipeline.context import DialogueContext
from streamer.pipeline.parts import RunnerParts

if TYPE_CHECKING:  # only its type: runner.py imports this module
    from streamer.pipeline.runner import Channel

log = logging.getLogger("streamer")


def prediction_fields(pred: Prediction) -> dict[str, Any]:
    """A prediction's fields in emotion, emotion.revised and emotion.partial events; `sentiment` and
    `sentiment_score` only when the model has a sentiment head, `familiar_voice` only when it is
    known (speech with Whisper states, a checkpoint with the check)."""
    fields = {"label": pred.label, "scores": pred.scores, "confidence": pred.confidence,
              "modality_weights": pred.modality_weights}
    if pred.sentiment is not None:
        fields.update(sentiment=pred.sentiment, sentiment_score=pred.sentiment_score)
    if pred.familiar_voice is not None:
        fields["familiar_voice"] = pred.familiar_voice
    return fields


@dataclass(eq=False)
class _Open:
    """Interim state of one channel's open utterance."""

    index: int  # the segmenter's utterance index
    utterance_id: int
    next_s: float  # stream position from which the next interim decode is due
    emotion_s: float  # ... from which it also gives an emotion.partial
    busy: bool = False  # a decode for it is in flight
    text: str = ""  # the last transcript.partial sent (an unchanged text is not sent again)


class InterimResults:
    """transcript.partial every interim_every_s of speech, emotion.partial every
    interim_emotion_every_s, for each channel's open utterance; a partial never follows its
    utterance's final events (their ended() drops what is still in flight)."""

    def __init__(self, parts: RunnerParts, context: DialogueContext, publish: Callable[..., None]) -> None:
        self.parts, self.context, self.publish = parts, context, publish
        self._open: dict[int, _Open] = {}  # channel -> its open utterance
        self._tasks: set[asyncio.Task[None]] = set()

    def started(self, channel: int, index: int, utterance_id: int, start_s: float) -> None:
        """The first partial once there is interim_every_s of speech after the pre-roll."""
        sc, lead = self.parts.config.server, self.parts.config.segmenter.pre_roll_s
        self._open[channel] = _Open(index, utterance_id, start_s + lead + sc.interim_every_s,
                                    start_s + lead + sc.interim_emotion_every_s)

    def ended(self, channel: int) -> None:
        self._open.pop(channel, None)

    def audio(self, ch: Channel, recent: Sequence[str]) -> None:
        """After a channel's audio: start an interim decode when one is due and a decoder is idle."""
        channel, seg, scored = ch.number, ch.session.segmenter, ch.scored
        st = self._open.get(channel)
        if st is None or st.busy or seg.position_s < st.next_s:
            return
        opened = seg.open_audio()
        if opened is None or opened[0] != st.index:
            return
        parts = self.parts
        # a channel in a pause may need a decoder for its final within 0.25 s: interim work waits then
        # (an interim decode takes about that long, so it rarely overlaps a final's decode)
        job = None if parts.finals_imminent() else parts.backend.interim(opened[1], context=list(recent), encode=scored)
        if job is None:  # decoders busy: try again with the next chunk
            parts.metrics.inc("emostream_interim_skipped_total")
            return
        sc = parts.config.server
        emotion = scored and seg.position_s >= st.emotion_s
        st.busy, st.next_s = True, seg.position_s + sc.interim_every_s
        if seg.position_s >= st.emotion_s:
            st.emotion_s = seg.position_s + sc.interim_emotion_every_s
        parts.metrics.inc("emostream_interim_total")
        who = {**ch.who, "audio_s": round(len(opened[1]) / SAMPLE_RATE, 2)}
        task = asyncio.create_task(self._result(channel, st, job, emotion, who))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _result(self, channel: int, st: _Open, job: AnalyzeJob, emotion: bool, who: dict[str, Any]) -> None:
        """Publish an interim decode's results unless the utterance has ended meanwhile."""
        try:
            analysis: Analysis = await job.future
            if self._open.get(channel) is not st:
                return
            text = analysis.transcript.text
            if text and text != st.text:  # nothing recognised yet, or no change: nothing to show
                st.text = text
                self.publish(P.TRANSCRIPT_PARTIAL, utterance_id=st.utterance_id, text=text, **who)
            if not emotion:
                return
            pred = await self.parts.backend.peek(self.context, analysis.encoded)
            if self._open.get(channel) is not st:
                return
            self.publish(P.EMOTION_PARTIAL, utterance_id=st.utterance_id, **prediction_fields(pred),
                         text=analysis.transcript.text, **who)
        except asyncio.CancelledError:
            if not job.future.cancelled():
                raise
        except Exception:  # best effort: the final events follow anyway
            log.exception("interim result failed")
        finally:
            st.busy = False

    async def close(self) -> None:
        """The utterances have ended: their interim results still in flight are moot."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Speculation:
    """Decodes started when a channel pauses after speech (SpeechPaused): if the utterance then
    ends with exactly that audio, its final uses the decode already under way."""

    def __init__(self, parts: RunnerParts) -> None:
        self.parts = parts
        self._jobs: dict[tuple[int, int], tuple[int, AnalyzeJob]] = {}  # (channel, index) -> (samples, job)

    def paused(self, key: tuple[int, int], audio: np.ndarray, recent: Sequence[str], words: bool,
               encode: bool = True) -> None:
        try:
            job = self.parts.backend.analyze(audio, context=list(recent), words=words, encode=encode,
                                             max_wait_s=self.parts.config.inference.speculate_max_wait_s)
        except Overloaded:
            return  # decoders behind: the decode is requested when the utterance ends
        self._jobs[key] = (len(audio), job)
        self.parts.metrics.inc("emostream_speculative_decodes_total")

    def resumed(self, key: tuple[int, int]) -> None:
        spec = self._jobs.pop(key, None)
        if spec is not None:
            spec[1].abandoned = True
            self.parts.metrics.inc("emostream_speculative_wasted_total")

    def take(self, key: tuple[int, int], audio: np.ndarray) -> AnalyzeJob | None:
        """The speculative decode of this ended utterance if it saw exactly `audio` (else it is withdrawn)."""
        spec = self._jobs.pop(key, None)
        if spec is None:
            return None
        if spec[0] == len(audio):
            return spec[1]
        spec[1].abandoned = True
        return None
