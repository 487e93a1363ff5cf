"""bench/asr_window.py's scoring (the suite's word edits, tests.stream_util) and the window steps it compares."""

from __future__ import annotations

from bench.asr_window import step_for
from tests.stream_util import wer, word_edits as edits, words
from model.features import whisper_window_frames


def test_word_edits():
    assert words("Kids are talking, by the door!") == ["kids", "are", "talking", "by", "the", "door"]
    assert edits(words("kids are talking by the door"), words("kids are talking by the door")) == 0
    assert edits(["a", "b", "c"], ["a", "c"]) == 1  # deletion
    assert edits(["a", "b"], ["a", "x", "b"]) == 1  # insertion
    assert edits(["a", "b"], ["b", "a"]) == 2
    assert edits([], ["a", "a"]) == 2 and edits(["a"], []) == 1
    assert wer("kids are talking", "kids talking") == 1 / 3


def test_windows_below_ten_seconds_step_by_two_and_a_half():
    assert step_for(30) == step_for(10) == 5.0 and step_for(7.5) == 2.5
    # a 3 s clip: 10 s with the 10 s minimum, 7.5 s with 7.5, 15 s with 15
    assert [whisper_window_frames(3 * 16000, w, 2.0, step_for(w)) for w in (15, 10, 7.5)] == [1500, 1000, 750]
