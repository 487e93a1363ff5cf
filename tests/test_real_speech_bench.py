"""bench/real_speech.py: its event parsing and summary, and one real run of the LJ recording
through the live service (speech only) from the test fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.real_speech import LJ, join, summarise, utterances

FIXTURES = Path(__file__).parent / "fixtures" / "speech"


def _emotion(uid: int, label: str, top: float, confidence: str, speech: float) -> dict:
    rest = (1 - top) / 6
    scores = {k: (top if k == label else rest) for k in ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")}
    return {"type": "emotion", "utterance_id": uid, "label": label, "scores": scores, "confidence": confidence,
            "modality_weights": {"speech": speech, "text": 1 - speech}}


def test_utterances_pair_each_emotion_with_its_transcript_and_summarise_counts_them() -> None:
    events = [{"type": "transcript", "utterance_id": 0, "text": "in being comparatively modern."},
              _emotion(0, "neutral", 0.8, "ok", 0.2),
              {"type": "transcript", "utterance_id": 1, "text": "has never been surpassed."},
              _emotion(1, "anger", 0.4, "low", 0.9),
              _emotion(2, "anger", 0.9, "ok", 1.0)]  # no transcript: empty text
    rows = utterances(events)
    assert [r["text"] for r in rows] == ["in being comparatively modern.", "has never been surpassed.", ""]
    assert [r["top_score"] for r in rows] == [0.8, 0.4, 0.9]
    s = summarise(rows)
    assert s["labels"] == {"anger": 2, "neutral": 1} and s["share"] == {"neutral": 0.333, "anger": 0.667}
    assert s["anger_ok_share"] == 0.333 and s["ok_confidence_share"] == 0.667 and s["mean_speech_weight"] == 0.7
    assert s["unfamiliar_share"] is None  # no event said
    rows[0]["familiar_voice"], rows[1]["familiar_voice"] = False, True
    assert summarise(rows)["unfamiliar_share"] == 0.5
    assert summarise([])["utterances"] == 0


def test_join_puts_silence_after_each_recording() -> None:
    from model.features import SAMPLE_RATE, load_audio

    paths = [FIXTURES / f for f in LJ[:2]]
    audio = join(paths, 0.5)
    sizes = [len(load_audio(str(p))) for p in paths]
    assert len(audio) == sum(sizes) + 2 * SAMPLE_RATE // 2
    assert not np.any(audio[sizes[0] : sizes[0] + SAMPLE_RATE // 2])


@pytest.mark.slow
def test_the_lj_recording_through_the_live_service(tmp_path: Path) -> None:
    from bench import real_speech

    out = tmp_path / "real_speech"
    assert real_speech.main(["--data", str(FIXTURES), "--recordings", "lj", "--runs", "speech", "--out", str(out)]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    run = rep["recordings"]["lj"]["speech"]
    assert run["summary"]["utterances"] == len(run["utterances"]) >= 3  # four sentences, 1 s apart
    assert sum(run["summary"]["share"].values()) == pytest.approx(1, abs=0.01)
    assert all(r["speech_weight"] == 1 for r in run["utterances"])  # --modalities speech
    assert rep["lj_neutral_share"]["speech"] == run["summary"]["share"].get("neutral", 0.0)
    assert out.with_suffix(".png").stat().st_size > 0 and rep["git"]["commit"]
    # the bundled checkpoint's check: LJ Speech's narration is unlike the acted training clips, and a
    # voice-only prediction on such a voice is never marked confident
    assert run["summary"]["unfamiliar_share"] == 1.0
    assert all(r["confidence"] == "low" for r in run["utterances"])
