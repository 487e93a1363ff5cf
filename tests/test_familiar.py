"""Familiar speech (training.familiar, EmotionModel.speech_distances / predict): the distance of an
utterance's pooled Whisper states from the training clips, and what a prediction says when its
voice is unlike them. A tiny model with 8-d "Whisper states" stands in for the real one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model import ModelConfig, load_checkpoint, save_checkpoint
from model.emotion_model import LOW_CONFIDENCE, OK_CONFIDENCE, EmotionModel
from training import familiar

DW = 8


def _states(n: int, seed: int, scale: np.ndarray | None = None, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.geomspace(5, 0.05, DW) if scale is None else scale
    return (rng.normal(size=(n, DW)) * scale + shift).astype(np.float32)


def test_the_distance_is_mahalanobis_and_the_threshold_a_validation_percentile() -> None:
    train = _states(400, 0)
    mean, whiten = familiar.fit(train, shrink=0.1)
    cov = np.cov(train - train.mean(0), rowvar=False)
    cov = 0.9 * cov + 0.1 * np.trace(cov) / DW * np.eye(DW)
    x = _states(5, 1)
    want = np.sqrt(np.einsum("ij,jk,ik->i", x - train.mean(0), np.linalg.inv(cov), x - train.mean(0)))
    assert familiar.distances(x, mean, whiten) == pytest.approx(want, rel=1e-4)
    val = _states(200, 2)
    limit = familiar.threshold(val, mean, whiten, 99)
    assert np.mean(familiar.distances(val, mean, whiten) > limit) == pytest.approx(0.01, abs=0.006)
    # a shift along a direction the training clips hardly vary in is far; the same shift along the widest is not
    along_narrow, along_wide = np.zeros(DW, np.float32), np.zeros(DW, np.float32)
    along_narrow[-1], along_wide[0] = 1.0, 1.0
    assert familiar.distances(along_narrow[None], mean, whiten)[0] > 3 * familiar.distances(along_wide[None], mean, whiten)[0]
    with pytest.raises(ValueError):
        familiar.fit(train[:1])
    with pytest.raises(ValueError):
        familiar.fit(train, shrink=0)


def _model(tiny_config: ModelConfig) -> EmotionModel:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**tiny_config.to_dict(), "whisper_dim": DW, "whisper_model": "tiny.en"})
    return EmotionModel(cfg).eval()


def test_a_checkpoint_carries_the_check_and_flags_an_unfamiliar_voice(tiny_config, tmp_path) -> None:
    model = _model(tiny_config)
    assert model.speech_distances([_states(1, 0)[0]]) == [None]  # no check: nothing known
    train = _states(300, 0)
    mean, whiten = familiar.fit(train)
    limit = familiar.threshold(_states(200, 1), mean, whiten)
    familiar.attach(model, mean, whiten, limit)
    path = save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(path, device="cpu")
    assert loaded.config.familiar_max_distance == pytest.approx(limit)
    near, far = _states(1, 5)[0], _states(1, 5, shift=3.0)[0]
    d = loaded.speech_distances([near, None, far, np.zeros(3, np.float32)])
    assert d[1] is None and d[3] is None and d[0] < limit < d[2]
    # serving (torch, on the model's device) measures what fitting (numpy) measured
    assert [d[0], d[2]] == pytest.approx(familiar.distances(np.stack([near, far]), mean, whiten).tolist(), rel=1e-5)

    audio = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    enc = loaded.encode_utterances([None, None, "hello there"], [audio, audio, None], whisper=[near, far, None])
    assert [loaded.familiar(e) for e in enc] == [True, False, None]  # words alone: not known
    dialogue = loaded.new_dialogue()
    idx = [dialogue.append(e) for e in enc]
    preds = loaded.predict([(dialogue, i) for i in idx], confidence_threshold=0.0)  # every top score passes
    assert [p.familiar_voice for p in preds] == [True, False, None]
    assert preds[0].confidence == OK_CONFIDENCE and preds[1].confidence == LOW_CONFIDENCE  # speech only: weight 1
    assert preds[0].label == max(preds[0].scores, key=preds[0].scores.get)
    # the label and scores are what they were without the check
    plain = _model(tiny_config)
    plain.load_state_dict({k: v for k, v in loaded.state_dict().items() if not k.startswith("familiar_")}, strict=False)
    d2 = plain.new_dialogue()
    j = d2.append(plain.encode_utterances([None], [audio], whisper=[far])[0])
    assert plain.predict([(d2, j)])[0].scores == pytest.approx(preds[1].scores, abs=1e-6)


def test_only_a_prediction_that_leaned_on_the_unfamiliar_voice_loses_confidence(tiny_config) -> None:
    model = _model(tiny_config)
    mean, whiten = familiar.fit(_states(300, 0))
    familiar.attach(model, mean, whiten, 1.0)
    audio = np.random.default_rng(1).normal(0, 0.1, 16000).astype(np.float32)
    enc = model.encode_utterances(["I am so happy for you!"], [audio], whisper=[_states(1, 3, shift=4.0)[0]])[0]
    dialogue = model.new_dialogue()
    i = dialogue.append(enc)
    forward = model.forward_features

    def weighted(speech: float):  # the fusion's modality weights, set
        def f(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = forward(*args, **kwargs)
            out.weights = torch.tensor([[speech, 1 - speech]]).expand_as(out.weights)
            return out
        return f

    for speech, want in ((0.8, LOW_CONFIDENCE), (0.5, LOW_CONFIDENCE), (0.2, OK_CONFIDENCE)):
        model.forward_features = weighted(speech)  # type: ignore[method-assign]
        pred = model.predict([(dialogue, i)], confidence_threshold=0.0)[0]
        assert pred.familiar_voice is False and pred.confidence == want, speech


def test_attach_refuses_a_model_without_whisper_states_and_bad_shapes(tiny_model) -> None:
    with pytest.raises(ValueError):
        familiar.attach(tiny_model, np.zeros(DW), np.eye(DW), 1.0)
    with pytest.raises(ValueError):
        ModelConfig(familiar_max_distance=1.0)  # needs whisper_dim
    with pytest.raises(ValueError):
        ModelConfig(whisper_dim=DW, familiar_max_distance=-1.0)


def test_fit_split_reports_the_share_called_unfamiliar_per_set() -> None:
    train, val, test = _states(300, 0), _states(200, 1), _states(100, 2, shift=3.0)
    whisper = np.concatenate([train, val, test])
    clip = np.arange(len(whisper))
    feats = SimpleNamespace(whisper=whisper, clip=clip, variant=np.zeros(len(whisper), int))
    feats.rows = lambda clips, variants="all": np.flatnonzero(np.isin(clip, list(clips)) & ((feats.variant == 0) if variants == "clean" else (feats.variant > 0) if variants == "aug" else True))
    parts = {"train": {"a": list(range(300))}, "val": {"a": list(range(300, 500))}, "test": {"far": list(range(500, 600))}}
    mean, whiten, limit, rep = familiar.fit_split(feats, parts, extra={"real/x": _states(10, 9, shift=5.0)})
    share = rep["unfamiliar_share"]
    assert share["val/a/clean"] == pytest.approx(0.01, abs=0.006) and share["test/far/clean"] > 0.9
    assert share["real/x"] == 1.0 and share["test/far/aug"] is None  # no live-like versions here
    assert rep["max_distance"] == pytest.approx(limit, abs=1e-3) and json.dumps(rep)


def test_a_remote_worker_sends_the_distance_to_the_front_end() -> None:
    from model import EncodedUtterance
    from streamer.infer.remote import parse_reply, reply_fields
    from streamer.infer.transcriber import Transcript
    from tests.test_word_timing import to_redis

    enc = EncodedUtterance(text_vec=None, speech_vec=torch.ones(4), speech_distance=57.25)
    fields = to_redis(reply_fields(b"j1", Transcript("hello", 0.0, -0.1), enc, 0.1, 0.02, "w1"))
    assert parse_reply(fields, torch.device("cpu"))[1].encoded.speech_distance == 57.25
    older = to_redis(reply_fields(b"j2", Transcript("hello", 0.0, -0.1), EncodedUtterance(None, torch.ones(4)), 0.1, 0.02, "w1"))
    assert b"sd" not in older and parse_reply(older, torch.device("cpu"))[1].encoded.speech_distance is None
