"""Per-session dialogue context: the last K utterances' cached features for the Bi-GRU.

Owned by one session but touched only on the engine's head thread (the model's Dialogue is not
thread-safe), so every read and write goes through InferenceEngine.predict.

`modalities` (InferenceConfig.modalities, --modalities) scores one modality alone: "speech" drops
every utterance's sentence vector before it enters the dialogue (so the Bi-GRU's window has no text
either), "text" drops every speech embedding. An utterance that lacks the kept modality (text only
with an empty transcript, speech only without audio) keeps the other one instead, so it is still
predicted rather than scored from nothing; Scored.fallback says so.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from model import Dialogue, EmotionModel, EncodedUtterance, Prediction
from streamer.config import MODALITIES


@dataclass(frozen=True)
class Scored:
    utterance_id: int
    prediction: Prediction
    revised_id: int | None = None  # the previous utterance, re-scored with this one as lookahead
    revised: Prediction | None = None
    # modalities "speech"/"text" only: the utterance lacked that modality, so it was scored on the other
    fallback: bool = False
    revised_fallback: bool = False  # the same for the re-scored previous utterance


def select_modalities(encoded: EncodedUtterance, modalities: str) -> tuple[EncodedUtterance, bool]:
    """The utterance with only the configured modality, and whether it had to keep the other one
    instead (it lacked the configured one; an utterance with neither is returned unchanged)."""
    if modalities == "both":
        return encoded, False
    if modalities == "speech":
        if encoded.speech_vec is not None:
            return replace(encoded, text_vec=None), False
        return encoded, encoded.text_vec is not None
    if modalities == "text":
        if encoded.text_vec is not None:
            return replace(encoded, speech_vec=None), False
        return encoded, encoded.speech_vec is not None
    raise ValueError(f"modalities must be one of {', '.join(MODALITIES)}, got {modalities!r}")


class DialogueContext:
    """Maps a session's utterance ids to positions in the model's rolling Dialogue cache."""

    def __init__(self, model: EmotionModel, revise: bool = True, modalities: str = "both") -> None:
        if modalities not in MODALITIES:
            raise ValueError(f"modalities must be one of {', '.join(MODALITIES)}, got {modalities!r}")
        self.dialogue: Dialogue = model.new_dialogue()
        self.revise = revise and model.config.lookahead > 0
        self.modalities = modalities
        self._ids: dict[int, int] = {}  # dialogue index -> utterance id
        self._fallback: dict[int, bool] = {}  # dialogue index -> scored on the other modality
        self._last: int | None = None  # dialogue index of the newest utterance

    def add(self, utterance_id: int, encoded: EncodedUtterance) -> list[tuple[Dialogue, int]]:
        """Append the newest utterance (only the configured modalities of it); return the predict
        requests: it, then the previous one."""
        encoded, fallback = select_modalities(encoded, self.modalities)
        index = self.dialogue.append(encoded)
        self._ids = {i: u for i, u in self._ids.items() if i >= self.dialogue.first_index}
        self._fallback = {i: f for i, f in self._fallback.items() if i >= self.dialogue.first_index}
        self._ids[index] = utterance_id
        self._fallback[index] = fallback
        self._last = index
        requests = [(self.dialogue, index)]
        if self.revise and index - 1 >= self.dialogue.first_index:
            requests.append((self.dialogue, index - 1))
        return requests

    def peek(self, encoded: EncodedUtterance) -> list[tuple[Dialogue, int]]:
        """A predict request for `encoded` as the next utterance, made on a copy of the dialogue
        (an interim emotion: the utterance is not finished, so nothing is added)."""
        encoded, _ = select_modalities(encoded, self.modalities)
        d = self.dialogue
        copy = Dialogue(d.max_len, deque(d.utterances), d.first_index)
        return [(copy, copy.append(encoded))]

    def scored(self, predictions: list[Prediction]) -> Scored:
        """Turn the predictions for add()'s requests into a Scored result."""
        assert self._last is not None
        uid, fallback = self._ids[self._last], self._fallback[self._last]
        if len(predictions) > 1:
            prev = self._last - 1
            return Scored(uid, predictions[0], self._ids[prev], predictions[1], fallback, self._fallback[prev])
        return Scored(uid, predictions[0], fallback=fallback)
