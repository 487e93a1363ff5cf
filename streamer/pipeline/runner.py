"""One session's pipeline: segment events -> inference jobs -> numbered events, in the order
utterances end; interim results while someone speaks (pipeline.interim); the observers' events
(alerts) and, at the end, the call summary. Runs on the event loop; it is given a RunnerParts
(pipeline.parts: an inference backend, an event sink, observers), never the App."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamer import protocol as P
from streamer.infer.backend import AnalyzeJob, Analysis, Overloaded
from streamer.infer.engine import CONTEXT_TRANSCRIPTS
from streamer.pipeline.interim import InterimResults, Speculation, prediction_fields
from streamer.pipeline.parts import RunnerParts
from streamer.pipeline.segmenter import SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted
from streamer.pipeline.session import Session
from streamer.pipeline.speakers import SessionSpeakers
from streamer.calls.summary import CallSummary

log = logging.getLogger("streamer")

__all__ = ["Channel", "SessionRunner"]


def word_fields(words: Any, start_s: float) -> dict[str, Any]:
    """A final transcript's `words`, timed from the stream's start (none when not asked for)."""
    if words is None:
        return {}
    return {"words": [{"word": w.word, "start_s": round(start_s + w.start_s, 3), "end_s": round(start_s + w.end_s, 3),
                       "probability": round(w.probability, 3)} for w in words]}


@dataclass(frozen=True)
class Channel:
    """One audio channel of a session with its own segmenter. A phone call has two (one per
    speaker); they share the session's event numbering and one dialogue context, in turn order."""

    number: int
    session: Session
    speaker: str | None = None  # None: a session of one unnamed channel
    # its utterances get emotion and sentiment (CallsConfig.score_sides, --score-sides: a named side
    # not listed is transcribed only, and none of its features is computed; docs/calls.md)
    scored: bool = True

    @property
    def who(self) -> dict[str, Any]:
        """The `speaker` and `channel` fields of a named channel's events."""
        return {"speaker": self.speaker, "channel": self.number} if self.speaker is not None else {}


@dataclass
class _Pending:
    end: SpeechEnded
    job: AnalyzeJob
    channel: Channel
    utterance_id: int
    voice: Any = None  # diarized sessions: the voice embedding's future (SessionSpeakers.ended)


class SessionRunner:
    """Drives one Session (one or more channels): segment events -> inference jobs -> events, in
    the order utterances end. Publishes the observers' events and, at the end, a call summary."""

    def __init__(self, parts: RunnerParts, session: Session, extra: list[Session] | None = None,
                 speakers: list[str] | None = None) -> None:
        self.parts = parts
        self.session = session  # channel 0: the session's id, event numbering and totals
        sessions = [session, *(extra or [])]
        if speakers is not None and len(speakers) != len(sessions):
            raise ValueError("one speaker name per channel")
        sides = parts.config.calls.score_sides
        names = speakers or [None] * len(sessions)
        self.channels = [Channel(i, s, names[i], not sides or names[i] is None or names[i] in sides)
                         for i, s in enumerate(sessions)]
        for ch in self.channels:  # a long turn is split only while the service has room
            ch.session.segmenter.may_split = self._room_to_split
        self.multi = speakers is not None
        self.context = parts.backend.new_context()
        # the dialogue's recent transcripts (all channels, in turn order), most recent first: sent
        # with each analyze job so the text encoder can read the utterance with what came before
        self.recent: deque[str] = deque(maxlen=CONTEXT_TRANSCRIPTS)
        self.summary = CallSummary(session.session_id)
        self._uids: dict[tuple[int, int], int] = {}  # (channel, segmenter index) -> utterance id
        self._uid_channel: list[int] = []  # utterance id -> its channel
        self.speculation = Speculation(parts)
        self.partials = InterimResults(parts, self.context, self.publish_interim)
        self._finish: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._finisher = asyncio.create_task(self._finish_loop())
        self._close_task: asyncio.Task[None] | None = None
        self._grace: asyncio.Task[None] | None = None  # running while a dropped source may resume
        self.closing = False
        self.interim = False  # start flag: transcript.partial / emotion.partial while someone speaks
        self.words = False  # start flag: final transcripts carry word timings
        self.speakers: SessionSpeakers | None = None  # start flag diarize: speakers within the one channel

    @property
    def position_s(self) -> float:
        """Seconds of audio received (channel 0)."""
        return self.session.segmenter.position_s

    @property
    def pending(self) -> int:
        """Ended utterances still waiting for their transcript and emotion."""
        return self._finish.qsize()

    @property
    def pausing(self) -> bool:
        """Some channel is in a pause after speech: its utterance may end soon."""
        return any(ch.session.segmenter.pausing for ch in self.channels)

    def _room_to_split(self) -> bool:
        """Whether the service has room for more work, by the test admission uses for a new session
        (ServerConfig.within_capacity). Splitting a long turn costs 4-16 % more CPU; past capacity its
        first part would wait in the queue instead of being decoded while the speaker goes on, so the
        turn stays whole there (bench/overload.py)."""
        b = self.parts.backend
        return self.parts.config.server.within_capacity(b.load(), b.wait_estimate_s())

    def publish(self, type_: str, **fields: Any) -> None:
        ev = self.session.event(type_, **fields)
        self.parts.sink.publish(ev)
        self.summary.add(ev)
        for observer in self.parts.observers:
            for answer, answer_fields in observer.on_event(ev):
                self.publish(answer, **answer_fields)

    def diarize(self, max_speakers: int | None = None) -> None:
        """Start flag diarize: label the speakers within this session's one channel (the voice
        model loads on the voice thread now if no session loaded it yet)."""
        if self.multi:
            raise ValueError("diarize is for one channel; named channels have their speakers already")
        if self.parts.voices is None:
            raise ValueError("diarize needs a voice embedder")
        self.speakers = SessionSpeakers.start(self.parts.voices, self.parts.config.diarize, max_speakers)

    def publish_interim(self, type_: str, **fields: Any) -> None:
        self.parts.sink.publish_interim(self.session.event(type_, **fields))

    def error(self, code: str, message: str) -> None:
        self.parts.metrics.inc("emostream_errors_total")
        self.publish(P.ERROR, **P.error_fields(code, message))

    def audio(self, samples: np.ndarray, channel: int = 0) -> None:
        """Feed 16 kHz float32 samples of one channel (on the event loop; VAD ~0.1 ms per 32 ms)."""
        if self.closing or samples.size == 0:
            return
        ch = self.channels[channel]
        self._handle(ch.session.feed(samples), ch)
        if self.interim:
            self.partials.audio(ch, self.recent)

    def finalize(self) -> None:
        """End the open utterances now (reason `finalize`), as if their speakers had stopped."""
        if not self.closing:
            for ch in self.channels:
                self._handle(ch.session.flush("finalize"), ch)

    def _uid(self, ch: Channel, index: int) -> int:
        key = (ch.number, index)
        if key not in self._uids:
            self._uids[key] = len(self._uids)
            self._uid_channel.append(ch.number)
        return self._uids[key]

    def _handle(self, events: list[Any], ch: Channel) -> None:
        for ev in events:
            uid, key = self._uid(ch, ev.index), (ch.number, ev.index)
            if isinstance(ev, SpeechStarted):
                self.publish(P.UTTERANCE_STARTED, utterance_id=uid, start_s=round(ev.start_s, 3), **ch.who)
                if self.interim:
                    self.partials.started(ch.number, ev.index, uid, ev.start_s)
            elif isinstance(ev, SpeechPaused):
                self.speculation.paused(key, ev.audio, self.recent, self.words,
                                        encode=ch.scored)
                if self.speakers is not None:
                    self.speakers.paused(ev.index, ev.audio)
            elif isinstance(ev, SpeechResumed):
                self.speculation.resumed(key)
                if self.speakers is not None:
                    self.speakers.resumed(ev.index)
            elif isinstance(ev, SpeechEnded):
                self._ended(ev, ch, uid, key)

    def _ended(self, ev: SpeechEnded, ch: Channel, uid: int, key: tuple[int, int]) -> None:
        """utterance.ended now; its decode (the speculative one if it saw exactly this audio) queued for the finisher."""
        self.partials.ended(ch.number)  # interim results of it still in flight are dropped
        self.parts.metrics.inc("emostream_utterances_total")
        self.session.utterances += 1
        self.publish(P.UTTERANCE_ENDED, utterance_id=uid, start_s=round(ev.start_s, 3), end_s=round(ev.end_s, 3),
                     reason=ev.reason, **ch.who)
        job = self.speculation.take(key, ev.audio)
        if job is None:
            try:
                job = self.parts.backend.analyze(ev.audio, context=list(self.recent), words=self.words,
                                                 encode=ch.scored)
            except Overloaded as e:
                self.parts.metrics.inc("emostream_overloaded_total")
                self.error(P.E_OVERLOADED, f"utterance {uid} skipped: {e}")
                return
        voice = self.speakers.ended(ev.index, ev.audio) if self.speakers is not None else None
        self._finish.put_nowait(_Pending(ev, job, ch, uid, voice))

    async def _finish_loop(self) -> None:
        """Publish transcript, emotion (and revision) for each ended utterance, in order. Nothing
        that goes wrong with one utterance stops the loop (the session would never end)."""
        while True:
            item = await self._finish.get()
            if item is None:
                return
            try:
                await self._finish_one(item)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("publishing utterance %s of %s failed", item.utterance_id, self.session.session_id)
                try:
                    self.error(P.E_INTERNAL, f"utterance {item.utterance_id}: {type(e).__name__}: {e}")
                except Exception:
                    log.exception("could not publish the error event either")

    async def _finish_one(self, item: _Pending) -> None:
        """Transcript, emotion and revision events for one ended utterance."""
        ev, uid, who = item.end, item.utterance_id, item.channel.who
        moved: list[Any] = []  # diarized: earlier utterances this one moved to another speaker
        try:
            analysis: Analysis = await item.job.future
            if analysis.transcript.redecoded:
                self.parts.metrics.inc("emostream_asr_redecoded_total")
            if self.speakers is not None:
                who, moved = await self._speaker(uid, item.voice)
            timed = word_fields(analysis.transcript.words, ev.start_s) if self.words else {}
            self.publish(P.TRANSCRIPT, utterance_id=uid, text=analysis.transcript.text, **timed, **who)
            for r in moved:
                self.publish(P.SPEAKER_REVISED, utterance_id=r.utterance_id, speaker=r.speaker,
                             previous_speaker=r.previous_speaker, revised_with=uid)
            if analysis.transcript.text.strip():
                self.recent.appendleft(analysis.transcript.text)
            if not item.channel.scored:  # --score-sides: transcribed, its words read as context, never scored
                return
            scored = await self.parts.backend.predict(self.context, uid, analysis.encoded)
        except asyncio.CancelledError:
            if not item.job.future.cancelled():
                raise  # this task itself is being cancelled
            self.error(P.E_INTERNAL, f"utterance {uid}: decode was cancelled")
            return
        except Overloaded as e:
            self.error(P.E_OVERLOADED, f"utterance {uid} skipped: {e}")
            return
        except Exception as e:  # a model failure skips this utterance, never the session
            log.exception("utterance %s of %s failed", uid, self.session.session_id)
            self.error(P.E_INTERNAL, f"utterance {uid} failed: {type(e).__name__}: {e}")
            return
        latency = item.channel.session.latency_ms(ev.end_s)
        self.parts.metrics.latency_seconds.observe(latency / 1000)
        pred = scored.prediction
        self.publish(P.EMOTION, utterance_id=uid, **prediction_fields(pred), latency_ms=latency,
                     asr_ms=round(analysis.asr_s * 1000, 1), text_masked=pred.modality_weights["text"] == 0.0, **who)
        if scored.revised is not None and scored.revised_id is not None:
            rid = scored.revised_id
            rwho = self.channels[self._uid_channel[rid]].who if self.speakers is None else self.speakers.who(rid)
            self.publish(P.EMOTION_REVISED, utterance_id=rid, **prediction_fields(scored.revised), revised_with=uid, **rwho)

    async def _speaker(self, uid: int, voice: Any) -> tuple[dict[str, Any], list[Any]]:
        """A diarized utterance's {"speaker": label} (empty when unknown: no voice, or the embedding
        failed, which gets an error event; the utterance goes on) and the earlier ones it moved."""
        assert self.speakers is not None
        try:
            label, moved = await self.speakers.assign(uid, voice)
        except Overloaded as e:
            self.parts.metrics.inc("emostream_overloaded_total")
            self.error(P.E_OVERLOADED, f"speaker of utterance {uid} unknown: {e}")
            return {}, []
        except Exception as e:  # the emotion still follows, without a speaker
            log.exception("speaker of utterance %s of %s failed", uid, self.session.session_id)
            self.error(P.E_INTERNAL, f"speaker of utterance {uid} unknown: {type(e).__name__}: {e}")
            return {}, []
        return ({"speaker": label} if label else {}), moved

    @property
    def detached(self) -> bool:
        return self._grace is not None

    def detach(self, grace_s: float) -> None:
        """The source dropped without `stop`: keep the session for `grace_s`, then finish it."""
        async def expire() -> None:
            await asyncio.sleep(grace_s)  # a timer, cancelled by reattach()
            self._grace = None
            await self.close()

        self._grace = asyncio.create_task(expire())

    def reattach(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def close(self) -> asyncio.Task[None]:
        """End of input: flush the open utterances, finish every utterance, publish session.ended."""
        if self._close_task is None:
            self.reattach()  # no longer waiting for a dropped source
            self._close_task = asyncio.create_task(self._close())
        return self._close_task

    async def _close(self) -> None:
        self.closing = True
        for ch in self.channels:
            self._handle(ch.session.flush(), ch)
        self._finish.put_nowait(None)
        await self._finisher
        await self.partials.close()
        self.session.ended = True
        summary = self.summary.to_dict()
        self.publish(P.CALL_SUMMARY, **{k: v for k, v in summary.items() if k != "session_id"})
        for observer in self.parts.observers:
            try:
                observer.on_end(summary)
            except Exception:  # a summary file that cannot be written must not keep the session open
                log.exception("%s failed at the end of %s", type(observer).__name__, self.session.session_id)
        self.publish(P.SESSION_ENDED, utterances=self.session.utterances)
        self.parts.closed(self.session.session_id)
