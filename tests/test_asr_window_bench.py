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


def test_service_path_counts_redecodes_and_scores_words():
    import numpy as np

    from bench.asr_window import service_path
    from streamer.config import AsrConfig
    from streamer.infer.transcriber import Transcript

    class Asr:  # "loud" audio was decoded again; its text is what the 30 s window said
        config = AsrConfig()

        def transcribe(self, audios):  # type: ignore[no-untyped-def]
            loud = float(np.max(audios[0])) > 0.5
            return [Transcript("dogs are sitting by the door" if loud else "kids are talking", 0.0, -0.1, redecoded=loud)]

    quiet, loud = np.zeros(8, np.float32), np.ones(8, np.float32)
    rav = [(quiet, "kids are talking by the door"), (loud, "dogs are sitting by the door")]
    out = service_path(Asr(), rav, {"r.wav": [loud, quiet]}, {"jfk.flac": [quiet]}, {"jfk.flac": "kids are talking"},
                       {"r.wav": ["dogs are sitting by the door", "kids are talking by the door"]})
    assert out["ravdess"] == {"clips": 2, "redecoded": 1, "wer": 3 / 12, "clips_off_by_3_words_or_more": 1}
    assert out["real"]["redecoded"] == 1 and out["real"]["utterances_differing_from_30s"] == 1
    assert out["real"]["word_edits_vs_30s"] == 3 and out["real"]["differing"][0]["utterance"] == 1
    assert out["referenced"] == {"utterances": 1, "redecoded": 0, "wer": 0.0}
    assert len(out["ms_per_utterance"]["redecoded"]) == 2
