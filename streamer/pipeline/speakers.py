"""A diarized session's voices, between the segmenter's events and the clustering: each utterance's
voice embedding is started on the voice thread when the segmenter first sees the pause (beside the
speculative Whisper decode, and dropped with it if speech resumes), so it is normally done before
the transcript; labels are assigned in utterance order, when the runner publishes the transcript.
The clustering itself is streamer/pipeline/diarize.py (synchronous, ~1.3 ms per utterance);
each utterance counts there with its seconds of voice."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import numpy as np

from streamer.infer.engine import Overloaded
from streamer.pipeline.diarize import Revision, SpeakerClusters

if TYPE_CHECKING:
    from typing import TypeAlias

    from streamer.config import DiarizeConfig
    from streamer.infer.voice import VoiceEmbedder

    VoiceFuture: TypeAlias = "asyncio.Future[tuple[np.ndarray, float] | None]"  # (embedding, seconds of voice)

MIN_WEIGHT_S = 0.1  # an utterance counts its seconds of voice in the clustering (at least this)


class SessionSpeakers:
    """Per session (one channel): embeddings per segmenter utterance index, labels per utterance id."""

    def __init__(self, embedder: VoiceEmbedder, clusters: SpeakerClusters) -> None:
        self.embedder = embedder
        self.clusters = clusters
        self._speculative: dict[int, tuple[int, VoiceFuture]] = {}

    @classmethod
    def start(cls, embedder: VoiceEmbedder, config: DiarizeConfig, max_speakers: int | None = None) -> SessionSpeakers:
        """A diarized session's speakers (the voice model starts loading on its thread if no session loaded it yet)."""
        clusters = SpeakerClusters(config.threshold, max_speakers, config.window, config.cap, space=embedder.space)
        embedder.preload()
        return cls(embedder, clusters)

    def _embed(self, audio: np.ndarray) -> VoiceFuture | Exception:
        try:
            return self.embedder.embed(audio)
        except (Overloaded, RuntimeError) as e:  # refused, or the voice thread is gone (shutting down)
            return e

    def paused(self, index: int, audio: np.ndarray) -> None:
        """The segmenter saw a pause: embed the utterance as it stands (it may still go on)."""
        voice = self._embed(audio)
        if not isinstance(voice, Exception):
            self._speculative[index] = (len(audio), voice)

    def resumed(self, index: int) -> None:
        spec = self._speculative.pop(index, None)
        if spec is not None:
            spec[1].cancel()  # skipped if the voice thread has not started it

    def ended(self, index: int, audio: np.ndarray) -> VoiceFuture | Exception:
        """The utterance's embedding: the speculative one when it saw exactly this audio."""
        spec = self._speculative.pop(index, None)
        if spec is not None and spec[0] == len(audio):
            return spec[1]
        if spec is not None:
            spec[1].cancel()
        return self._embed(audio)

    async def assign(self, utterance_id: int,
                     voice: VoiceFuture | Exception) -> tuple[str | None, list[Revision]]:
        """The utterance's speaker (None when it has no voice: silence) and the earlier utterances
        it moved. Raises what the embedding raised (Overloaded when it was refused)."""
        if isinstance(voice, Exception):
            raise voice
        try:
            embedding = await voice
        except asyncio.CancelledError:
            if not voice.cancelled():
                raise  # the caller itself is being cancelled
            raise RuntimeError("the voice embedding was cancelled (shutting down)") from None
        if embedding is None:
            return None, []
        vector, seconds = embedding
        return self.clusters.add(utterance_id, vector, weight=max(seconds, MIN_WEIGHT_S))

    def label(self, utterance_id: int) -> str | None:
        return self.clusters.labels.get(utterance_id)

    def who(self, utterance_id: int) -> dict[str, str]:
        """The `speaker` field of the utterance's events (none while it has no label)."""
        label = self.label(utterance_id)
        return {"speaker": label} if label else {}
