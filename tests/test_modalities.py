"""--modalities: the service scores speech or text alone by dropping the other vector of every
utterance before it enters the dialogue; an utterance lacking the kept modality keeps the other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import EncodedUtterance
from streamer.pipeline.context import DialogueContext, select_modalities


def _encoded(model, text: str = "I can't believe you did that!") -> EncodedUtterance:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
    (enc,) = model.encode_utterances([text], [audio])
    assert enc.text_vec is not None and enc.speech_vec is not None
    return enc


def test_select_modalities_drops_the_other_vector() -> None:
    t, s = torch.ones(4), torch.zeros(3)
    both = EncodedUtterance(text_vec=t, speech_vec=s)
    assert select_modalities(both, "both") == (both, False)
    speech, fb = select_modalities(both, "speech")
    assert speech.text_vec is None and speech.speech_vec is s and not fb
    text, fb = select_modalities(both, "text")
    assert text.speech_vec is None and text.text_vec is t and not fb
    # lacking the kept modality: keep the other one and say so
    no_text = EncodedUtterance(text_vec=None, speech_vec=s)
    assert select_modalities(no_text, "text") == (no_text, True)
    assert select_modalities(no_text, "speech") == (no_text, False)
    no_speech = EncodedUtterance(text_vec=t, speech_vec=None)
    assert select_modalities(no_speech, "speech") == (no_speech, True)
    nothing = EncodedUtterance(text_vec=None, speech_vec=None)
    assert select_modalities(nothing, "text") == (nothing, False)
    with pytest.raises(ValueError, match="modalities"):
        select_modalities(both, "audio")


@pytest.mark.parametrize("modalities, kept, dropped", [("speech", "speech", "text"), ("text", "text", "speech")])
def test_one_modality_alone_is_all_the_model_sees(tiny_model, modalities: str, kept: str, dropped: str) -> None:
    ctx = DialogueContext(tiny_model, revise=True, modalities=modalities)
    enc = _encoded(tiny_model)
    for uid in range(3):  # a dialogue: the Bi-GRU's window must hold no dropped vector either
        scored = ctx.scored(tiny_model.predict(ctx.add(uid, enc)))
        assert not scored.fallback
        assert scored.prediction.modality_weights[dropped] == 0.0
        assert scored.prediction.modality_weights[kept] == pytest.approx(1.0)
        assert scored.revised is None or scored.revised.modality_weights[dropped] == 0.0
    for i in range(ctx.dialogue.first_index, ctx.dialogue.last_index + 1):
        utt = ctx.dialogue[i]
        assert getattr(utt, f"{dropped}_vec") is None
        assert getattr(utt, f"{kept}_vec") is getattr(enc, f"{kept}_vec")


def test_both_keeps_both(tiny_model) -> None:
    ctx = DialogueContext(tiny_model)
    enc = _encoded(tiny_model)
    scored = ctx.scored(tiny_model.predict(ctx.add(0, enc)))
    assert ctx.dialogue[0].text_vec is enc.text_vec and ctx.dialogue[0].speech_vec is enc.speech_vec
    assert not scored.fallback and 0.0 < scored.prediction.modality_weights["text"] < 1.0


def test_text_only_with_an_empty_transcript_falls_back_to_speech(tiny_model) -> None:
    ctx = DialogueContext(tiny_model, revise=True, modalities="text")
    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
    silent, spoken = tiny_model.encode_utterances(["", "well, fine"], [audio, audio])
    assert silent.text_vec is None
    first = ctx.scored(tiny_model.predict(ctx.add(0, silent)))
    assert first.fallback and first.prediction.modality_weights["speech"] == pytest.approx(1.0)
    assert ctx.dialogue[0].speech_vec is silent.speech_vec
    second = ctx.scored(tiny_model.predict(ctx.add(1, spoken)))
    assert not second.fallback and second.prediction.modality_weights["speech"] == 0.0
    assert second.revised_id == 0 and second.revised_fallback
    assert abs(sum(first.prediction.scores.values()) - 1) < 1e-5


def test_the_switch_reaches_each_session_context(tiny_model) -> None:
    from streamer.__main__ import build_parser, config_from_args
    from streamer.config import InferenceConfig
    from streamer.infer.engine import InferenceEngine
    from streamer.metrics import Metrics

    assert InferenceConfig().modalities == "both"
    with pytest.raises(ValueError, match="modalities"):
        InferenceConfig(modalities="video")
    cfg = config_from_args(build_parser().parse_args(["--modalities", "speech"]))
    assert cfg.inference.modalities == "speech"
    assert config_from_args(build_parser().parse_args([])).inference.modalities == "both"
    from tests.stream_util import StubAsr

    engine = InferenceEngine(tiny_model, asr=StubAsr(), config=cfg.inference, metrics=Metrics())
    assert engine.new_context().modalities == "speech"  # what every session gets (server.py: engine.new_context())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--modalities", "audio"])
