"""Honest uncertainty: every prediction, and every emotion / emotion.partial / emotion.revised event,
says `confidence: "low"` when its calibrated top score is below a threshold (ModelConfig's, 0.5, or
--low-confidence), else "ok"; checkpoints from before the threshold load with the default."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from model import EmotionModel, EncodedUtterance, ModelConfig, load_checkpoint, save_checkpoint
from model.emotion_model import LOW_CONFIDENCE, OK_CONFIDENCE, confidence_of
from streamer import protocol as P
from streamer.config import InferenceConfig
from streamer.infer.engine import InferenceEngine
from streamer.infer.transcriber import Transcript
from streamer.metrics import Metrics

from tests.stream_util import StubAsr, WAIT_S, check_session_events, load


class FakeAsr(StubAsr):
    """A fixed transcript for every utterance: these tests are about the scores, not about Whisper."""

    def transcribe(self, audios: list[np.ndarray], words: Sequence[bool] | None = None,
                   redecode: Sequence[bool] | None = None) -> list[Transcript]:
        return [Transcript("well, I don't know", 0.0, -0.1) for _ in audios]


def _encoded(model: EmotionModel) -> EncodedUtterance:
    audio = (0.1 * np.random.default_rng(0).standard_normal(16_000)).astype(np.float32)
    (enc,) = model.encode_utterances(["I can't believe you did that!"], [audio])
    return enc


def _predict(model: EmotionModel, threshold: float | None = None):  # type: ignore[no-untyped-def]
    dialogue = model.new_dialogue()
    (pred,) = model.predict([(dialogue, dialogue.append(_encoded(model)))], threshold)
    return pred


# ---- the model: Prediction.confidence ------------------------------------------------------------
def test_flat_scores_are_low_and_peaked_ones_ok(tiny_model) -> None:
    labels = tiny_model.config.labels
    assert confidence_of({lab: 1 / len(labels) for lab in labels}, 0.5) == LOW_CONFIDENCE
    assert confidence_of({"joy": 0.9, "neutral": 0.1}, 0.5) == OK_CONFIDENCE
    assert confidence_of({"joy": 0.5, "neutral": 0.5}, 0.5) == OK_CONFIDENCE  # "below" is strict
    # through predict(): a huge temperature flattens the calibrated scores, a tiny one sharpens them
    tiny_model.config = dataclasses.replace(tiny_model.config, temperature=1e4)
    flat = _predict(tiny_model)
    assert max(flat.scores.values()) < 0.2 and flat.confidence == LOW_CONFIDENCE
    tiny_model.config = dataclasses.replace(tiny_model.config, temperature=1e-4)
    peaked = _predict(tiny_model)
    assert max(peaked.scores.values()) > 0.99 and peaked.confidence == OK_CONFIDENCE
    assert peaked.label == flat.label  # temperature never changes the label, only how sure it is


def test_the_threshold_comes_from_the_config_unless_overridden(tiny_model) -> None:
    assert ModelConfig().confidence_threshold == 0.5
    top = max(_predict(tiny_model).scores.values())
    tiny_model.config = dataclasses.replace(tiny_model.config, confidence_threshold=top + 1e-3)
    assert _predict(tiny_model).confidence == LOW_CONFIDENCE
    tiny_model.config = dataclasses.replace(tiny_model.config, confidence_threshold=top - 1e-3)
    assert _predict(tiny_model).confidence == OK_CONFIDENCE
    assert _predict(tiny_model, threshold=1.0).confidence == LOW_CONFIDENCE  # the argument wins
    assert _predict(tiny_model, threshold=0.0).confidence == OK_CONFIDENCE
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="confidence_threshold"):
            ModelConfig(confidence_threshold=bad)


def test_checkpoints_keep_the_threshold_and_old_ones_load_with_the_default(tiny_config, tmp_path: Path) -> None:
    old = tiny_config.to_dict()
    del old["confidence_threshold"]
    assert ModelConfig.from_dict(old).confidence_threshold == 0.5
    torch.manual_seed(0)
    path = save_checkpoint(EmotionModel(dataclasses.replace(tiny_config, confidence_threshold=0.7)), tmp_path / "new.pt")
    assert load_checkpoint(path, device="cpu").config.confidence_threshold == 0.7
    blob = torch.load(path, map_location="cpu", weights_only=True)
    del blob["config"]["confidence_threshold"]  # a checkpoint written before the field existed
    torch.save(blob, tmp_path / "old.pt")
    model = load_checkpoint(tmp_path / "old.pt", device="cpu")
    assert model.config.confidence_threshold == 0.5
    assert _predict(model).confidence in (LOW_CONFIDENCE, OK_CONFIDENCE)


# ---- the service: --low-confidence, both inference engines, the events --------------------------
def test_low_confidence_flag_and_config() -> None:
    from streamer.__main__ import build_parser, config_from_args

    assert (P.LOW_CONFIDENCE, P.OK_CONFIDENCE) == (LOW_CONFIDENCE, OK_CONFIDENCE)  # clients read protocol's
    assert config_from_args(build_parser().parse_args([])).inference.low_confidence is None
    assert config_from_args(build_parser().parse_args(["--low-confidence", "0.3"])).inference.low_confidence == 0.3
    for bad in ("1.5", "-0.1", "often"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--low-confidence", bad])
    with pytest.raises(ValueError, match="low_confidence"):
        InferenceConfig(low_confidence=2.0)


@pytest.mark.parametrize("remote", [False, True], ids=["in-process", "remote-head"])
def test_engines_apply_the_override_to_predictions_and_peeks(tiny_model, remote: bool) -> None:
    """The in-process engine and the --inference front-end (whose head predicts locally from the
    workers' encodings) both score with InferenceConfig.low_confidence."""
    enc = _encoded(tiny_model)

    async def scenario(threshold: float) -> list[str]:
        if remote:  # no Redis is contacted: predictions never leave the front-end
            from streamer.infer.remote import RemoteInferenceEngine

            cfg = InferenceConfig(device="cpu", remote="unix:///nonexistent/redis.sock", low_confidence=threshold)
            engine = RemoteInferenceEngine(tiny_model, cfg, Metrics())
            head = engine.head
        else:
            engine = head = InferenceEngine(tiny_model, FakeAsr(), InferenceConfig(device="cpu", low_confidence=threshold),
                                            Metrics())
        head.start()
        try:
            ctx = engine.new_context()
            first = await asyncio.wait_for(engine.predict(ctx, 0, enc), WAIT_S)
            second = await asyncio.wait_for(engine.predict(ctx, 1, enc), WAIT_S)  # re-scores the first
            peek = await asyncio.wait_for(engine.peek(ctx, enc), WAIT_S)
            assert second.revised is not None
            return [first.prediction.confidence, second.prediction.confidence, second.revised.confidence, peek.confidence]
        finally:
            await asyncio.to_thread(head.stop)

    assert asyncio.run(scenario(0.0)) == [OK_CONFIDENCE] * 4
    assert asyncio.run(scenario(1.0)) == [LOW_CONFIDENCE] * 4


def test_published_events_carry_confidence_from_the_cli_threshold(emotion_model) -> None:  # noqa: F811
    """`--low-confidence 0` through config_from_args: every emotion and revision is "ok" (the tiny
    model's near-uniform scores are "low" at the default 0.5: test_stream_units checks that)."""
    from streamer.__main__ import build_parser, config_from_args
    from streamer.client import stream_audio
    from streamer.server import create_app

    cfg = config_from_args(build_parser().parse_args(["--port", "0", "--device", "cpu", "--low-confidence", "0"]))

    async def scenario():  # type: ignore[no-untyped-def]
        app = create_app(cfg, model=emotion_model, asr=FakeAsr())
        await app.start()
        try:
            return await stream_audio(app.url, load("jfk.flac"), realtime=False)
        finally:
            await asyncio.wait_for(app.shutdown(), WAIT_S)

    res = asyncio.run(scenario())
    check_session_events(res.events)
    emotions, revised = res.of_type(P.EMOTION), res.of_type(P.EMOTION_REVISED)
    assert len(emotions) >= 2 and revised
    assert all(e["confidence"] == OK_CONFIDENCE for e in emotions + revised)
    assert all(max(e["scores"].values()) < 0.5 for e in emotions)  # so the default would have said "low"


from tests.stream_util import emotion_model  # noqa: E402,F401  (session fixture)


# ---- the views: terminal lines mark low-confidence emotions -------------------------------------
def test_terminal_views_mark_low_confidence_emotions() -> None:
    from clients.client import Event
    from clients.render import Renderer
    from streamer.client import format_event

    base = {"session_id": "s", "utterance_id": 0, "label": "joy", "scores": {"joy": 0.41, "neutral": 0.39, "anger": 0.2},
            "modality_weights": {"speech": 0.4, "text": 0.6}}
    emotion = {**base, "type": P.EMOTION, "seq": 3, "latency_ms": 500.0}
    revised = {**base, "type": P.EMOTION_REVISED, "seq": 5, "revised_with": 1}
    partial = {**base, "type": P.EMOTION_PARTIAL, "seq": 2, "text": "well", "audio_s": 2.0}
    for ev in (emotion, revised, partial):
        low, ok, old = ({**ev, "confidence": c} for c in (P.LOW_CONFIDENCE, P.OK_CONFIDENCE, None))
        del old["confidence"]  # an older server: no field, nothing marked
        assert "(low confidence)" in (format_event(low) or "")
        assert "(low confidence)" not in (format_event(ok) or "") + (format_event(old) or "")
    for ev in (emotion, revised):
        low, ok = (Event.from_json(json.dumps({**ev, "confidence": c})) for c in (P.LOW_CONFIDENCE, P.OK_CONFIDENCE))
        assert "0.41 (low confidence)" in Renderer(colour=False).render(low)[0]
        assert "(low confidence)" not in Renderer(colour=False).render(ok)[0]


def test_terminal_views_say_when_the_voice_was_unfamiliar() -> None:
    from clients.client import Event
    from clients.render import Renderer
    from streamer.client import format_event

    ev = {"type": P.EMOTION, "seq": 3, "session_id": "s", "utterance_id": 0, "label": "anger", "latency_ms": 500.0,
          "scores": {"anger": 0.88, "neutral": 0.12}, "modality_weights": {"speech": 0.99, "text": 0.01}}
    unfamiliar = {**ev, "confidence": P.LOW_CONFIDENCE, "familiar_voice": False}
    familiar_low = {**ev, "confidence": P.LOW_CONFIDENCE, "familiar_voice": True}
    unfamiliar_ok = {**ev, "confidence": P.OK_CONFIDENCE, "familiar_voice": False}  # the words carried it
    assert "0.88 (low confidence: unfamiliar voice)" in Renderer(colour=False).render(Event.from_json(json.dumps(unfamiliar)))[0]
    assert "(low confidence: unfamiliar voice)" in (format_event(unfamiliar) or "")
    assert "(low confidence)" in (format_event(familiar_low) or "") and "unfamiliar" not in (format_event(familiar_low) or "")
    assert "low confidence" not in (format_event(unfamiliar_ok) or "")
