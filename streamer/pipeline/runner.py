"""One session's pipeline: segment events -> inference jobs -> numbered events, in the order
utterances end; interim results while someone speaks; alerts and, at the end, the call summary.
Runs on the event loop; the models are reached only through the App's inference engine."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from streamer import protocol as P
from streamer.config import SAMPLE_RATE
from streamer.infer.engine import CONTEXT_TRANSCRIPTS, Analysis, Overloaded
from streamer.pipeline.segmenter import SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted
from streamer.pipeline.session import Session
from streamer.pipeline.diarize import SpeakerClusters
from streamer.pipeline.speakers import SessionSpeakers
from streamer.calls.summary import CallSummary

if TYPE_CHECKING:
    from streamer.server import App

log = logging.getLogger("streamer")


def sentiment_fields(pred: Any) -> dict[str, Any]:
    """`sentiment` and `sentiment_score` of an emotion event; none when the model has no sentiment head."""
    if getattr(pred, "sentiment", None) is None:
        return {}
    return {"sentiment": pred.sentiment, "sentiment_score": pred.sentiment_score}


@dataclass(frozen=True)
class Channel:
    """One audio channel of a session with its own segmenter. A phone call has two (one per
    speaker); they share the session's event numbering and one dialogue context, in turn order."""

    number: int
    session: Session
    speaker: str | None = None


@dataclass
class _Pending:
    end: SpeechEnded
    job: Any  # the inference job whose future gives an Analysis
    channel: Channel
    utterance_id: int
    voice: Any = None  # diarized sessions: the voice embedding's future (SessionSpeakers.ended)


@dataclass(eq=False)
class _Interim:
    """Interim results of one channel's open utterance (SessionRunner.interim)."""

    index: int  # the segmenter's utterance index
    utterance_id: int
    next_s: float  # stream position from which the next interim decode is due
    emotion_s: float  # ... from which it also gives an emotion.partial
    busy: bool = False  # a decode for it is in flight
    text: str = ""  # the last transcript.partial sent (an unchanged text is not sent again)


class SessionRunner:
    """Drives one Session (one or more channels): segment events -> inference jobs -> events, in
    the order utterances end. Publishes alerts and, at the end, a call summary.

    Longer than the ~250-line guide: finals, speculative decodes, interim results, resume and
    close all touch the same per-utterance state (ids, pending jobs, the open utterance), which
    splitting would turn into shared mutable state between classes."""

    def __init__(self, app: App, session: Session, extra: list[Session] | None = None,
                 speakers: list[str] | None = None) -> None:
        self.app = app
        self.session = session  # channel 0: the session's id, event numbering and totals
        sessions = [session, *(extra or [])]
        if speakers is not None and len(speakers) != len(sessions):
            raise ValueError("one speaker name per channel")
        self.channels = [Channel(i, s, speakers[i] if speakers else None) for i, s in enumerate(sessions)]
        self.multi = speakers is not None
        self.context = app.engine.new_context()
        # the dialogue's recent transcripts (all channels, in turn order), most recent first: sent
        # with each analyze job so the text encoder can read the utterance with what came before
        self.recent: deque[str] = deque(maxlen=CONTEXT_TRANSCRIPTS)
        self.summary = CallSummary(session.session_id)
        self._uids: dict[tuple[int, int], int] = {}  # (channel, segmenter index) -> utterance id
        self._uid_channel: list[int] = []  # utterance id -> its channel
        self._speculative: dict[tuple[int, int], Any] = {}  # -> (samples, job) started at SpeechPaused
        self._finish: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._finisher = asyncio.create_task(self._finish_loop())
        self._close_task: asyncio.Task[None] | None = None
        self._grace: asyncio.Task[None] | None = None  # running while a dropped source may resume
        self.closing = False
        self.interim = False  # start flag: transcript.partial / emotion.partial while someone speaks
        self.words = False  # start flag: final transcripts carry word timings
        self.speakers: SessionSpeakers | None = None  # start flag diarize: speakers within the one channel
        self._open: dict[int, _Interim] = {}  # channel -> its open utterance's interim state
        self._interim_tasks: set[asyncio.Task[None]] = set()

    def publish(self, type_: str, **fields: Any) -> None:
        ev = self.session.event(type_, **fields)
        self.app.hub.publish(ev)
        self.summary.add(ev)
        if type_ == P.EMOTION and self.app.alerts is not None:
            for alert in self.app.alerts.evaluate(ev):
                self.app.metrics.inc("emostream_alerts_total")
                self.publish(P.ALERT, **alert)
                if self.app.webhook is not None:
                    self.app.webhook.send({"type": P.ALERT, "session_id": self.session.session_id, **alert})

    def diarize(self, max_speakers: int | None = None) -> None:
        """Start flag diarize: label the speakers within this session's one channel (the voice
        model loads on the voice thread now if no session loaded it yet)."""
        if self.multi:
            raise ValueError("diarize is for one channel; named channels have their speakers already")
        dc, voices = self.app.config.diarize, self.app.voices
        clusters = SpeakerClusters(dc.threshold, max_speakers, dc.window, dc.cap, center=voices.center)
        self.speakers = SessionSpeakers(voices, clusters)
        voices.preload()

    def publish_interim(self, type_: str, **fields: Any) -> None:
        self.app.hub.publish_interim(self.session.event(type_, **fields))

    def error(self, code: str, message: str) -> None:
        self.app.metrics.inc("emostream_errors_total")
        self.publish(P.ERROR, **P.error_fields(code, message))

    def audio(self, samples: np.ndarray, channel: int = 0) -> None:
        """Feed 16 kHz float32 samples of one channel (on the event loop; VAD ~0.1 ms per 32 ms)."""
        if self.closing or samples.size == 0:
            return
        ch = self.channels[channel]
        self._handle(ch.session.feed(samples), ch)
        if self.interim:
            self._maybe_interim(ch)

    def finalize(self) -> None:
        """End the open utterances now (reason `finalize`), as if their speakers had stopped."""
        if not self.closing:
            for ch in self.channels:
                self._handle(ch.session.flush("finalize"), ch)

    def _maybe_interim(self, ch: Channel) -> None:
        """Start an interim decode of the open utterance when one is due and a decoder is idle."""
        st = self._open.get(ch.number)
        seg = ch.session.segmenter
        if st is None or st.busy or seg.position_s < st.next_s:
            return
        opened = seg.open_audio()
        if opened is None or opened[0] != st.index:
            return
        # a channel in a pause may need a decoder for its final within 0.25 s: interim work waits then
        # (an interim decode takes about that long, so it rarely overlaps a final's decode)
        job = None if self.app.finals_imminent() else self.app.engine.interim(opened[1], context=list(self.recent))
        if job is None:  # decoders busy: try again with the next chunk
            self.app.metrics.inc("emostream_interim_skipped_total")
            return
        sc = self.app.config.server
        emotion = seg.position_s >= st.emotion_s
        st.busy, st.next_s = True, seg.position_s + sc.interim_every_s
        if emotion:
            st.emotion_s = seg.position_s + sc.interim_emotion_every_s
        self.app.metrics.inc("emostream_interim_total")
        task = asyncio.create_task(self._interim_result(ch, st, job, emotion, len(opened[1]) / SAMPLE_RATE))
        self._interim_tasks.add(task)
        task.add_done_callback(self._interim_tasks.discard)

    async def _interim_result(self, ch: Channel, st: _Interim, job: Any, emotion: bool, audio_s: float) -> None:
        """Publish an interim decode's results unless the utterance has ended meanwhile (its final
        events supersede them, so a partial never follows them)."""
        try:
            analysis: Analysis = await job.future
            if self._open.get(ch.number) is not st:
                return
            who = {**self._who(ch), "audio_s": round(audio_s, 2)}
            text = analysis.transcript.text
            if text and text != st.text:  # nothing recognised yet, or no change: nothing to show
                st.text = text
                self.publish_interim(P.TRANSCRIPT_PARTIAL, utterance_id=st.utterance_id, text=text, **who)
            if not emotion or not self.scores(ch):
                return
            pred = await self.app.engine.peek(self.context, analysis.encoded)
            if self._open.get(ch.number) is not st:
                return
            self.publish_interim(P.EMOTION_PARTIAL, utterance_id=st.utterance_id, label=pred.label, scores=pred.scores,
                                 confidence=pred.confidence, modality_weights=pred.modality_weights,
                                 text=analysis.transcript.text, **sentiment_fields(pred), **who)
        except asyncio.CancelledError:
            if not job.future.cancelled():
                raise
        except Exception:  # best effort: the final events follow anyway
            log.exception("interim result of %s failed", self.session.session_id)
        finally:
            st.busy = False

    def scores(self, ch: Channel) -> bool:
        """Whether this channel's utterances get emotion and sentiment (CallsConfig.score_sides,
        --score-sides: a named side not listed is transcribed only; docs/calls.md)."""
        sides = self.app.config.calls.score_sides
        return not sides or ch.speaker is None or ch.speaker in sides

    def _who(self, ch: Channel) -> dict[str, Any]:
        return {"speaker": ch.speaker, "channel": ch.number} if self.multi else {}

    def _uid(self, ch: Channel, index: int) -> int:
        key = (ch.number, index)
        if key not in self._uids:
            self._uids[key] = len(self._uids)
            self._uid_channel.append(ch.number)
        return self._uids[key]

    def _handle(self, events: list[Any], ch: Channel) -> None:
        engine, metrics = self.app.engine, self.app.metrics
        for ev in events:
            uid = self._uid(ch, ev.index)
            if isinstance(ev, SpeechStarted):
                self.publish(P.UTTERANCE_STARTED, utterance_id=uid, start_s=round(ev.start_s, 3), **self._who(ch))
                if self.interim:  # the first partial once there is interim_every_s of speech after the pre-roll
                    sc, lead = self.app.config.server, self.app.config.segmenter.pre_roll_s
                    self._open[ch.number] = _Interim(ev.index, uid, ev.start_s + lead + sc.interim_every_s,
                                                     ev.start_s + lead + sc.interim_emotion_every_s)
            elif isinstance(ev, SpeechPaused):
                try:
                    job = engine.analyze(ev.audio, context=list(self.recent), words=self.words,
                                         max_wait_s=self.app.config.inference.speculate_max_wait_s)
                    self._speculative[(ch.number, ev.index)] = (len(ev.audio), job)
                    metrics.inc("emostream_speculative_decodes_total")
                except Overloaded:
                    pass  # decoders behind: the decode is requested when the utterance ends
                if self.speakers is not None:
                    self.speakers.paused(ev.index, ev.audio)
            elif isinstance(ev, SpeechResumed):
                spec = self._speculative.pop((ch.number, ev.index), None)
                if spec is not None:
                    spec[1].abandoned = True
                    metrics.inc("emostream_speculative_wasted_total")
                if self.speakers is not None:
                    self.speakers.resumed(ev.index)
            elif isinstance(ev, SpeechEnded):
                self._open.pop(ch.number, None)  # interim results of it still in flight are dropped
                metrics.inc("emostream_utterances_total")
                self.session.utterances += 1
                self.publish(
                    P.UTTERANCE_ENDED, utterance_id=uid, start_s=round(ev.start_s, 3),
                    end_s=round(ev.end_s, 3), reason=ev.reason, **self._who(ch),
                )
                spec = self._speculative.pop((ch.number, ev.index), None)
                if spec is not None and spec[0] == len(ev.audio):
                    job = spec[1]  # the speculative decode saw exactly this audio
                else:
                    if spec is not None:
                        spec[1].abandoned = True
                    try:
                        job = engine.analyze(ev.audio, context=list(self.recent), words=self.words)
                    except Overloaded as e:
                        metrics.inc("emostream_overloaded_total")
                        self.error(P.E_OVERLOADED, f"utterance {uid} skipped: {e}")
                        continue
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
        ev, uid, who = item.end, item.utterance_id, self._who(item.channel)
        moved: list[Any] = []  # diarized: earlier utterances this one moved to another speaker
        try:
            analysis: Analysis = await item.job.future
            if self.speakers is not None:
                who, moved = await self._speaker(uid, item.voice)
            words = getattr(analysis.transcript, "words", None)
            timed = {"words": [{"word": w.word, "start_s": round(ev.start_s + w.start_s, 3),
                                "end_s": round(ev.start_s + w.end_s, 3), "probability": round(w.probability, 3)}
                               for w in words]} if self.words and words is not None else {}
            self.publish(P.TRANSCRIPT, utterance_id=uid, text=analysis.transcript.text, **timed, **who)
            for r in moved:
                self.publish(P.SPEAKER_REVISED, utterance_id=r.utterance_id, speaker=r.speaker,
                             previous_speaker=r.previous_speaker, revised_with=uid)
            if analysis.transcript.text.strip():
                self.recent.appendleft(analysis.transcript.text)
            if not self.scores(item.channel):  # --score-sides: transcribed, its words read as context, never scored
                return
            scored = await self.app.engine.predict(self.context, uid, analysis.encoded)
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
        self.app.metrics.latency_seconds.observe(latency / 1000)
        pred = scored.prediction
        self.publish(
            P.EMOTION, utterance_id=uid, label=pred.label, scores=pred.scores, confidence=pred.confidence,
            modality_weights=pred.modality_weights, **sentiment_fields(pred), latency_ms=latency,
            asr_ms=round(analysis.asr_s * 1000, 1), text_masked=pred.modality_weights["text"] == 0.0, **who,
        )
        if scored.revised is not None:
            r = scored.revised
            rwho = self._who(self.channels[self._uid_channel[scored.revised_id]]) if self.multi else \
                self._speaker_of(scored.revised_id)
            self.publish(
                P.EMOTION_REVISED, utterance_id=scored.revised_id, label=r.label, scores=r.scores,
                confidence=r.confidence, modality_weights=r.modality_weights, **sentiment_fields(r), revised_with=uid, **rwho,
            )

    async def _speaker(self, uid: int, voice: Any) -> tuple[dict[str, Any], list[Any]]:
        """A diarized utterance's {"speaker": label} (empty when unknown: no voice, or the embedding
        failed, which gets an error event; the utterance goes on) and the earlier ones it moved."""
        assert self.speakers is not None
        try:
            label, moved = await self.speakers.assign(uid, voice)
        except Overloaded as e:
            self.app.metrics.inc("emostream_overloaded_total")
            self.error(P.E_OVERLOADED, f"speaker of utterance {uid} unknown: {e}")
            return {}, []
        except Exception as e:  # the emotion still follows, without a speaker
            log.exception("speaker of utterance %s of %s failed", uid, self.session.session_id)
            self.error(P.E_INTERNAL, f"speaker of utterance {uid} unknown: {type(e).__name__}: {e}")
            return {}, []
        return ({"speaker": label} if label else {}), moved

    def _speaker_of(self, uid: int) -> dict[str, Any]:
        label = self.speakers.label(uid) if self.speakers is not None else None
        return {"speaker": label} if label else {}

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
        for task in list(self._interim_tasks):  # the utterances ended: their interim results are moot
            task.cancel()
        await asyncio.gather(*self._interim_tasks, return_exceptions=True)
        self.session.ended = True
        summary = self.summary.to_dict()
        self.publish(P.CALL_SUMMARY, **{k: v for k, v in summary.items() if k != "session_id"})
        self.app.save_summary(summary)
        if self.app.webhook is not None:
            self.app.webhook.send({"type": P.CALL_SUMMARY, **summary})
        if self.app.alerts is not None:
            self.app.alerts.forget(self.session.session_id)
        self.publish(P.SESSION_ENDED, utterances=self.session.utterances)
        self.app.sessions.pop(self.session.session_id, None)
