"""The paper's architecture, fusion equations, masking, serving and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from model import CheckpointError, EmotionModel, ModelConfig, load_checkpoint, save_checkpoint
from model import features
from model.audio_encoder import SpeechCNN
from model.fusion import AttentionFusion
from tests.conftest import SPEECH


# ---- speech CNN: exactly the paper's layers -----------------------------------------------------
def test_speech_cnn_layers_match_paper():
    cnn = SpeechCNN(n_mels=64, out_dim=256)
    assert cnn.conv_time.kernel_size == (10, 2) and cnn.conv_time.out_channels == 8
    assert cnn.conv_freq.kernel_size == (2, 8) and cnn.conv_freq.out_channels == 8
    assert cnn.bn_in.num_features == 16
    chans = [(b.conv.in_channels, b.conv.out_channels) for b in cnn.blocks]
    assert chans == [(16, 32), (32, 48), (48, 64), (64, 80)]
    for i, b in enumerate(cnn.blocks):
        assert b.conv.kernel_size == (3, 3) and b.conv.stride == (1, 1) and b.conv.padding == (1, 1)
        assert isinstance(b.bn, nn.BatchNorm2d) and b.bn.num_features == b.conv.out_channels
        assert isinstance(b.pool, nn.MaxPool2d) == (i < 2), "max-pool 2 after conv 1 and conv 2 only"
        if i < 2:
            assert b.pool.kernel_size == 2


def test_speech_cnn_shapes_through_the_network():
    cnn = SpeechCNN(n_mels=64, out_dim=256).eval()
    mel = torch.randn(2, 1, 64, 101)
    lengths = torch.tensor([101, 80])
    x = torch.cat([cnn.conv_time(cnn.pad_time(mel)), cnn.conv_freq(cnn.pad_freq(mel))], dim=1)
    assert x.shape == (2, 16, 64, 101), "parallel convs are 'same' padded and concatenated to 16"
    for block, shape in zip(cnn.blocks, [(32, 32, 50), (48, 16, 25), (64, 16, 25), (80, 16, 25)]):
        x = block(x)
        assert tuple(x.shape[1:]) == shape
    assert cnn(mel, lengths).shape == (2, 256)
    with pytest.raises(ValueError):
        cnn(torch.randn(2, 64, 101), lengths)


def test_batching_never_changes_an_utterances_embedding():
    torch.manual_seed(0)
    cnn = SpeechCNN(n_mels=64, out_dim=256).eval()
    short, long = torch.randn(1, 1, 64, 57), torch.randn(1, 1, 64, 130)
    batch = torch.zeros(2, 1, 64, 130)
    batch[0, :, :, :57], batch[1] = short, long
    both = cnn(batch, torch.tensor([57, 130]))
    torch.testing.assert_close(both[0:1], cnn(short, torch.tensor([57])), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both[1:2], cnn(long, torch.tensor([130])), atol=1e-6, rtol=1e-5)


# ---- fusion: equations (1)-(3) -------------------------------------------------------------------
def test_fusion_equals_equations_by_hand():
    torch.manual_seed(1)
    fus = AttentionFusion(speech_dim=4, text_dim=5, n=3)
    s, t = torch.randn(2, 4), torch.randn(2, 5)
    M, v = fus(s, t, torch.ones(2, 2, dtype=torch.bool))
    P, w = fus.P.detach().numpy(), fus.w.detach().numpy()
    for b in range(2):
        Fs = fus.proj_speech.weight.detach().numpy() @ s[b].numpy() + fus.proj_speech.bias.detach().numpy()
        Ft = fus.proj_text.weight.detach().numpy() @ t[b].numpy() + fus.proj_text.bias.detach().numpy()
        F = np.stack([Fs, Ft], axis=1)  # (n, 2)
        L = np.tanh(P @ F)  # (1)
        e = np.exp(w @ L - (w @ L).max())
        v_hand = e / e.sum()  # (2)
        M_hand = F @ v_hand  # (3)
        np.testing.assert_allclose(v[b].detach().numpy(), v_hand, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(M[b].detach().numpy(), M_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.sum(-1), torch.ones(2))


def test_missing_modality_gets_weight_exactly_zero():
    torch.manual_seed(2)
    fus = AttentionFusion(4, 5, n=6)
    s, t = torch.randn(3, 4), torch.randn(3, 5)
    present = torch.tensor([[True, False], [False, True], [True, True]])
    M, v = fus(s, t, present)
    assert v[0].tolist() == [1.0, 0.0] and v[1].tolist() == [0.0, 1.0]
    assert 0 < v[2, 0] < 1
    torch.testing.assert_close(M[0], fus.proj_speech(s[0]))
    # a masked modality's input has no influence at all
    M2, _ = fus(s, t * 100 + 7, present)
    torch.testing.assert_close(M2[0], M[0])
    with pytest.raises(ValueError, match="at least one modality"):
        fus(s, t, torch.tensor([[False, False]] * 3))


def test_model_dimensions_match_paper(tiny_model):
    cfg = tiny_model.config
    assert cfg.fusion_dim == 250 and tiny_model.fusion.P.shape == (250, 250)
    assert tiny_model.fusion.proj_speech.out_features == 250 and tiny_model.fusion.proj_text.out_features == 250
    assert tiny_model.dialogue.fc_in.out_features == 100
    gru = tiny_model.dialogue.gru
    assert gru.hidden_size == 100 and gru.bidirectional and gru.input_size == 100
    assert tiny_model.classifier.out_features == 7 and cfg.labels[0] == "neutral"
    assert cfg.dropout == 0.3


# ---- log-mel front end on real speech -------------------------------------------------------------
def test_log_mel_of_real_recording():
    audio = features.load_audio(str(SPEECH / "jfk.flac"))
    assert audio.dtype == np.float32 and abs(len(audio) / features.SAMPLE_RATE - 11.0) < 0.01
    mel = features.log_mel(audio)
    assert mel.shape == (features.N_MELS, 1 + len(audio) // features.HOP_LENGTH)
    assert abs(mel.mean()) < 1e-3 and abs(mel.std() - 1) < 1e-3
    lj = features.load_audio(str(SPEECH / "LJ001-0002.wav"))  # 22.05 kHz file, resampled on load
    assert abs(len(lj) / 16_000 - 83770 / 2 / 22050) < 0.05


def test_variable_length_policy():
    rng = np.random.default_rng(0)
    short = features.log_mel(rng.standard_normal(1600).astype(np.float32) * 0.1)  # 0.1 s
    assert short.shape == (features.N_MELS, features.MIN_FRAMES)
    long = features.log_mel(rng.standard_normal(20 * 16000).astype(np.float32) * 0.1)  # 20 s -> 15 s
    assert long.shape == (features.N_MELS, features.MAX_FRAMES + 1)
    cnn = SpeechCNN(64, 32).eval()
    mels, lengths = features.pad_batch([short, long])
    assert cnn(torch.from_numpy(mels), torch.from_numpy(lengths)).shape == (2, 32)


# ---- serving ---------------------------------------------------------------------------------------
def _speech(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def test_serving_encodes_each_utterance_once_and_batches_sessions(tiny_model, monkeypatch):
    calls: list[list[str]] = []
    real = tiny_model.text_encoder.forward
    monkeypatch.setattr(tiny_model.text_encoder, "forward", lambda texts, **kw: calls.append(list(texts)) or real(texts, **kw))
    a, b = tiny_model.new_dialogue(), tiny_model.new_dialogue()
    texts = ["Hi there.", "What happened?", "I can't believe it!", "Oh no."]
    for i, t in enumerate(texts):
        ua, ub = tiny_model.encode_utterances([t, t.upper()], [_speech(1.0, i), _speech(2.0, i + 10)])
        ia, ib = a.append(ua), b.append(ub)
        batched = tiny_model.predict([(a, ia), (b, ib)])
        alone = tiny_model.predict([(a, ia)]) + tiny_model.predict([(b, ib)])
        for x, y in zip(batched, alone):
            assert x.label == y.label
            np.testing.assert_allclose(list(x.scores.values()), list(y.scores.values()), atol=1e-5)
            assert abs(sum(x.scores.values()) - 1) < 1e-5
            assert abs(sum(x.modality_weights.values()) - 1) < 1e-5
    assert [len(c) for c in calls] == [2] * len(texts), "each utterance's text is encoded exactly once"


def test_live_prediction_uses_no_future_and_revision_uses_next(tiny_model):
    dlg = tiny_model.new_dialogue()
    for i, t in enumerate(["Hello.", "You look upset."]):
        dlg.append(tiny_model.encode_utterances([t], [_speech(1.0, i)])[0])
    live = tiny_model.predict([(dlg, 1)])[0]
    dlg.append(tiny_model.encode_utterances(["Leave me alone!"], [_speech(1.5, 9)])[0])
    revised = tiny_model.predict([(dlg, 1)])[0]
    assert revised.scores != live.scores, "a revision sees the next utterance"
    # with lookahead 0 the same window is used as live, so the result is identical
    import dataclasses

    causal = EmotionModel(dataclasses.replace(tiny_model.config, lookahead=0), text_encoder=tiny_model.text_encoder)
    causal.load_state_dict(tiny_model.state_dict())
    again = causal.predict([(dlg, 1)])[0]
    np.testing.assert_allclose(list(again.scores.values()), list(live.scores.values()), atol=1e-6)


def test_dialogue_cache_is_bounded(tiny_model):
    dlg = tiny_model.new_dialogue()
    utt = tiny_model.encode_utterances(["ok"], [None])[0]
    for _ in range(30):
        last = dlg.append(utt)
    assert last == 29 and len(dlg.utterances) == tiny_model.config.context_window + tiny_model.config.lookahead
    with pytest.raises(IndexError):
        tiny_model.predict([(dlg, 0)])


def test_empty_transcript_masks_text_and_no_audio_masks_speech(tiny_model):
    dlg = tiny_model.new_dialogue()
    u = tiny_model.encode_utterances(["", "   ", "Fine."], [_speech(1.0, 0), _speech(0.4, 1), None])
    assert u[0].text_vec is None and u[1].text_vec is None and u[2].speech_vec is None
    idx = [dlg.append(x) for x in u]
    p = tiny_model.predict([(dlg, i) for i in idx])
    assert p[0].modality_weights == {"speech": 1.0, "text": 0.0}
    assert p[1].modality_weights == {"speech": 1.0, "text": 0.0}
    assert p[2].modality_weights == {"speech": 0.0, "text": 1.0}


@pytest.mark.parametrize("dialogue", [False, True])
def test_sentiment_head_from_words_and_from_emotion_without_words(tiny_config, tmp_path, dialogue):
    import dataclasses

    from model.config import SENTIMENT_LABELS
    from model.emotion_model import sentiment_from_emotion, sentiment_of

    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_config, sentiment_labels=SENTIMENT_LABELS, sentiment_dialogue=dialogue)
    model = EmotionModel(cfg).eval()
    with torch.no_grad():  # a head that reads only the bias: words always say "positive" 0.8 / 0.1 / 0.1
        model.sentiment_head.weight.zero_()
        model.sentiment_head.bias.copy_(torch.log(torch.tensor([0.1, 0.1, 0.8])))
    assert model.sentiment_head.in_features == 32 + cfg.text_dim * dialogue
    dlg = model.new_dialogue()
    u = model.encode_utterances(["Great, thanks!", ""], [None, _speech(1.0, 0)])
    p = model.predict([(dlg, dlg.append(x)) for x in u])
    assert (p[0].sentiment, p[0].sentiment_score) == ("positive", pytest.approx(0.7, abs=1e-4))
    assert (p[1].sentiment, p[1].sentiment_score) == sentiment_from_emotion(p[1].scores)  # no words: from the emotion
    assert sentiment_from_emotion({"joy": 0.1, "anger": 0.5, "sadness": 0.2, "neutral": 0.2}) == ("negative", -0.6)
    assert sentiment_of({"negative": 0.2, "neutral": 0.5, "positive": 0.3}) == ("neutral", 0.1)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "s.pt"), device="cpu")  # the head travels in the checkpoint
    assert loaded.config.sentiment_labels == SENTIMENT_LABELS and loaded.config.sentiment_dialogue is dialogue
    q = loaded.predict([(dlg, 0)])[0]
    assert (q.sentiment, q.sentiment_score) == (p[0].sentiment, p[0].sentiment_score)
    assert EmotionModel(tiny_config).eval().predict([(dlg, 0)])[0].sentiment is None  # no head: no sentiment
    with pytest.raises(ValueError, match="sentiment_labels"):
        dataclasses.replace(tiny_config, sentiment_labels=("bad", "good"))


# ---- checkpoints -------------------------------------------------------------------------------------
def test_checkpoint_round_trip_is_exact(tiny_model, tiny_encoder_dir, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "m.pt", metadata={"run": "test"})
    assert not any(k.startswith("text_encoder.") for k in torch.load(path, weights_only=True)["state_dict"]), \
        "a frozen encoder is referenced, not stored"
    loaded = load_checkpoint(path, device="cpu")
    assert loaded.config == tiny_model.config and loaded.metadata == {"run": "test"}
    torch.manual_seed(3)
    mel, lengths = torch.randn(3, 1, 64, 90), torch.tensor([90, 60, 50])
    ctx, clen = torch.randn(3, 4, 32), torch.tensor([4, 2, 1])
    tgt, present = torch.tensor([3, 1, 0]), torch.tensor([[True, True], [True, False], [False, True]])
    with torch.no_grad():
        a = tiny_model(mel, lengths, ctx, clen, tgt, present)
        b = loaded(mel, lengths, ctx, clen, tgt, present)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_format", "future_version", "bad_weights"])
def test_corrupt_checkpoint_is_a_clear_error(tiny_model, tmp_path, damage):
    path = save_checkpoint(tiny_model, tmp_path / "m.pt")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 100)
    else:
        blob = torch.load(path, weights_only=True)
        if damage == "wrong_format":
            blob["format"] = "something-else"
        elif damage == "future_version":
            blob["format_version"] = 99
        else:
            blob["state_dict"].pop("classifier.weight")
        torch.save(blob, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_device_resolution():
    from model import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            resolve_device("cuda")


def test_config_validation_and_dict_round_trip():
    cfg = ModelConfig(labels=("a", "b", "c"))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        ModelConfig(labels=("a", "a"))
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"labels": ["a", "b"], "nonsense": 1})
    with pytest.raises(Exception):
        cfg.labels = ("x", "y")  # frozen


# ---- the packaged encoder works with the network off -------------------------------------------------
def test_packaged_encoder_loads_offline(monkeypatch):
    import socket

    from model.text_encoder import TextEncoder

    def no_network(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder("all-MiniLM-L6-v2")
    assert enc.hidden_size == 384
    v = torch.nn.functional.normalize(enc(["I am so happy today!", "What a joyful day.", "The invoice is attached.", ""]), dim=-1)
    assert v.shape == (4, 384) and torch.all(v[3] == 0)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2, "a real sentence embedding, not noise"


def test_unknown_encoder_is_a_clear_error(monkeypatch):
    from model.text_encoder import EncoderNotFound, TextEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderNotFound, match="not available offline"):
        TextEncoder("no-such-org/no-such-encoder-xyz")


def test_speech_sub_batches_do_not_change_embeddings(tiny_model):
    rng = np.random.default_rng(5)
    mels = [features.log_mel((rng.standard_normal(int(s * 16000)) * 0.1).astype(np.float32)) for s in (3.0, 0.6, 9.0, 1.5)]
    whole = tiny_model.embed_speech(mels, max_frames=10**9)  # one batch
    split = tiny_model.embed_speech(mels, max_frames=1)  # one utterance per sub-batch
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=1e-4)
    alone = torch.cat([tiny_model.embed_speech([m]) for m in mels])
    torch.testing.assert_close(whole, alone, atol=1e-5, rtol=1e-4)
