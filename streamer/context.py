"""Per-session dialogue context: the last K utterances' cached features for the Bi-GRU.

Owned by one session but touched only on the inference thread (the model's Dialogue is not
thread-safe), so every read and write goes through InferenceEngine.predict.
"""

from __future__ import annotations

from dataclasses import dataclass

from model import Dialogue, EmotionModel, EncodedUtterance, Prediction


@dataclass(frozen=True)
class Scored:
    utterance_id: int
    prediction: Prediction
    revised_id: int | None = None  # the previous utterance, re-scored with this one as lookahead
    revised: Prediction | None = None


class DialogueContext:
    """Maps a session's utterance ids to positions in the model's rolling Dialogue cache."""

    def __init__(self, model: EmotionModel, revise: bool = True) -> None:
        self.dialogue: Dialogue = model.new_dialogue()
        self.revise = revise and model.config.lookahead > 0
        self._ids: dict[int, int] = {}  # dialogue index -> utterance id
        self._last: int | None = None  # dialogue index of the newest utterance

    def add(self, utterance_id: int, encoded: EncodedUtterance) -> list[tuple[Dialogue, int]]:
        """Append the newest utterance; return the predict requests: it, then the previous one."""
        index = self.dialogue.append(encoded)
        self._ids = {i: u for i, u in self._ids.items() if i >= self.dialogue.first_index}
        self._ids[index] = utterance_id
        self._last = index
        requests = [(self.dialogue, index)]
        if self.revise and index - 1 >= self.dialogue.first_index:
            requests.append((self.dialogue, index - 1))
        return requests

    def scored(self, predictions: list[Prediction]) -> Scored:
        """Turn the predictions for add()'s requests into a Scored result."""
        assert self._last is not None
        uid = self._ids[self._last]
        if len(predictions) > 1:
            return Scored(uid, predictions[0], self._ids[self._last - 1], predictions[1])
        return Scored(uid, predictions[0])
