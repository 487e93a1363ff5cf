"""The newer recipe pieces: live-audio augmentation, the text encoder's context pairs, pooled
Whisper states, fine-tuned-encoder checkpoints with a temperature, and FLAC corpora."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch

from model import features
from training import augment

SR = features.SAMPLE_RATE


def _tone(freq: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---- training.augment ------------------------------------------------------------------------------
@pytest.mark.parametrize("snr_db", [0.0, 5.0, 12.5, 25.0])
def test_add_noise_hits_the_requested_snr(snr_db):
    speech = _tone(440, 1.0, 0.3) + _tone(1300, 1.0, 0.1)
    noise = (np.random.default_rng(0).standard_normal(5000) * 0.7).astype(np.float32)  # shorter: looped
    mixed = augment.add_noise(speech, noise, snr_db)
    assert mixed.shape == speech.shape and mixed.dtype == np.float32
    added = mixed.astype(np.float64) - speech
    got = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(added**2))
    assert abs(got - snr_db) < 0.5, got
    # the added signal is the given noise (looped), only scaled
    looped = np.tile(noise, 4)[: speech.size]
    assert abs(np.corrcoef(added, looped)[0, 1]) > 0.999


def test_mulaw_phone_keeps_length_and_a_speech_band_tone():
    tone = _tone(440, 1.0, 0.5)
    out = augment.mulaw_phone(tone)
    assert abs(out.size - tone.size) <= 4 and out.dtype == np.float32
    n = min(out.size, tone.size)
    assert np.corrcoef(out[:n], tone[:n])[0, 1] > 0.9
    assert np.max(np.abs(out)) < 0.6
    # the 8 kHz phone line cannot carry a 6 kHz tone (Nyquist 4 kHz)
    high = _tone(6000, 1.0, 0.5)
    gone = augment.mulaw_phone(high)
    assert np.sqrt(np.mean(gone**2)) < 0.05 * np.sqrt(np.mean(high**2))


def test_mulaw_phone_quantises_to_at_most_256_levels():
    ramp = np.linspace(-0.9, 0.9, SR).astype(np.float32)
    # companded 8-bit code words: the 8 kHz signal before upsampling has <= 256 distinct values
    from model.features import resample

    x = np.clip(resample(ramp, SR, 8000), -1, 1)
    mu = 255.0
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    assert len(np.unique(np.round((y + 1) / 2 * 255))) <= 256
    out = augment.mulaw_phone(ramp)
    assert np.corrcoef(out[: ramp.size], ramp[: out.size])[0, 1] > 0.99  # coarse, not destroyed


@pytest.mark.parametrize("margin_s", [0.25, 0.1])
def test_trim_silence_removes_padding_but_keeps_the_margin(margin_s):
    tone = _tone(440, 1.0, 0.5)
    pad = np.zeros(SR, dtype=np.float32)
    padded = np.concatenate([pad, tone, pad])
    out = augment.trim_silence(padded, margin_s=margin_s)
    expected = tone.size + 2 * int(margin_s * SR)
    assert abs(out.size - expected) < 0.05 * SR, (out.size, expected)
    assert np.isclose(np.sum(out.astype(np.float64) ** 2), np.sum(tone.astype(np.float64) ** 2), rtol=1e-4), \
        "the whole tone is kept"
    # the silence left is on both sides, about margin_s each
    nz = np.flatnonzero(np.abs(out) > 1e-4)
    lead, trail = nz[0], out.size - 1 - nz[-1]
    for side in (lead, trail):
        assert abs(side - margin_s * SR) < 0.05 * SR, (lead, trail)


def test_trim_silence_of_a_clip_without_silence_and_of_nothing():
    tone = _tone(440, 1.0)
    assert augment.trim_silence(tone).size == tone.size
    assert augment.trim_silence(np.zeros(0, np.float32)).size == 0


def test_random_crop_respects_min_frac_and_half_a_second():
    audio = np.arange(3 * SR, dtype=np.float32)  # values = positions: a crop is a contiguous run
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(200):
        c = augment.random_crop(audio, rng, min_frac=0.7)
        assert int(0.7 * audio.size) <= c.size <= audio.size
        assert np.all(np.diff(c) == 1), "contiguous"
        assert c[0] >= 0 and c[-1] < audio.size
        lengths.append(c.size)
    assert min(lengths) < 0.8 * audio.size and max(lengths) > 0.95 * audio.size, "lengths are spread"
    short = np.arange(int(0.8 * SR), dtype=np.float32)
    for _ in range(100):
        c = augment.random_crop(short, rng, min_frac=0.1)
        assert SR // 2 <= c.size <= short.size and np.all(np.diff(c) == 1)
    tiny = np.arange(SR // 4, dtype=np.float32)  # shorter than 0.5 s: kept whole
    assert np.array_equal(augment.random_crop(tiny, rng), tiny)


def test_live_like_is_deterministic_per_seed_finite_and_in_range():
    rng = np.random.default_rng(7)
    clip = (np.clip(rng.standard_normal(2 * SR) * 0.5, -1, 1) * 0.99).astype(np.float32)
    babble = [_tone(200, 3.0, 0.3), _tone(330, 0.5, 0.2)]
    outs = []
    for seed in range(12):
        a = augment.live_like(clip, np.random.default_rng(seed), babble=babble)
        b = augment.live_like(clip, np.random.default_rng(seed), babble=babble)
        assert np.array_equal(a, b), "same seed, same result"
        assert a.dtype == np.float32 and np.all(np.isfinite(a)) and np.max(np.abs(a)) <= 1.0
        assert SR // 2 <= a.size <= clip.size + 8
        outs.append(a)
    distinct = {o.tobytes() for o in outs}
    assert len(distinct) == len(outs), "different seeds give different versions"


# ---- model.text_encoder: context pairs --------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from model.text_encoder import TextEncoder

    return TextEncoder("all-MiniLM-L6-v2", max_tokens=24)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _rows(batch) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


def test_context_pair_format_most_recent_first(minilm):
    tok = minilm.tokenizer
    batch = minilm.tokenize(["i am fine"], [["how are you", "hello there"]])
    (row,) = _rows(batch)
    assert tok.decode(row) == "[CLS] i am fine [SEP] how are you [SEP] hello there [SEP]"
    assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
    assert row.count(tok.sep_token_id) == 3


def test_utterance_is_never_cut_for_context_and_oldest_context_goes_first(minilm):
    tok = minilm.tokenizer
    utt = "the quick brown fox jumps over the lazy dog again"
    a = _ids(tok, utt)
    recent, older = "one two three four five six", "seven eight nine ten eleven twelve"
    batch = minilm.tokenize([utt, "ok"], [[recent, older], [recent, older]])
    rows = _rows(batch)
    assert batch["input_ids"].shape[1] <= minilm.max_tokens
    for row in rows:
        assert len(row) <= minilm.max_tokens
    long_row, short_row = rows
    assert long_row[1 : 1 + len(a)] == a and long_row[1 + len(a)] == tok.sep_token_id, "utterance intact"
    ctx = long_row[2 + len(a) : -1]
    assert len(long_row) == minilm.max_tokens, "the context fills what is left"
    assert len(ctx) == minilm.max_tokens - len(a) - 3
    joined = _ids(tok, f"{recent} [SEP] {older}")
    assert len(_ids(tok, recent)) + 1 < len(ctx) < len(joined), "this case cuts inside the older utterance"
    assert ctx == joined[: len(ctx)], "the most recent context comes first and is kept; the oldest words are cut"
    # a short utterance leaves room for all of the recent context and the start of the older one
    assert tok.decode(short_row).startswith("[CLS] ok [SEP] one two three four five six [SEP] seven")


def test_long_utterance_fills_the_budget_and_drops_all_context(minilm):
    tok = minilm.tokenizer
    utt = " ".join(["word"] * 40)
    (row,) = _rows(minilm.tokenize([utt], [["some context"]]))
    assert len(row) == minilm.max_tokens
    assert row == [tok.cls_token_id] + _ids(tok, utt)[: minilm.max_tokens - 2] + [tok.sep_token_id]


def test_no_context_equals_the_plain_tokenizer(minilm):
    tok = minilm.tokenizer
    texts = ["hello there", "a much longer sentence " * 6, "why?"]
    plain = tok(texts, padding=True, truncation=True, max_length=minilm.max_tokens, return_tensors="pt")
    none = minilm.tokenize(texts, None)
    assert set(none.keys()) == set(plain.keys())
    for k in plain:
        assert torch.equal(none[k], plain[k])
    empty = minilm.tokenize(texts, [[], ["", "  "], []])  # no usable context: same ids as no context
    assert torch.equal(empty["input_ids"], plain["input_ids"])
    assert torch.equal(empty["attention_mask"], plain["attention_mask"])


def test_context_respects_max_tokens_for_roberta_style_specials(minilm, monkeypatch):
    """<s> a </s></s> b </s> has four special tokens, not three: the budget must still hold."""
    bert = minilm.tokenizer
    fake = types.SimpleNamespace(
        encode=bert.encode, pad=bert.pad, sep_token="</s>", cls_token_id=None, sep_token_id=None,
        bos_token_id=bert.cls_token_id, eos_token_id=bert.sep_token_id,
    )
    monkeypatch.setattr(minilm, "tokenizer", fake)
    for utt in ("hi", "the quick brown fox jumps over the lazy dog"):
        (row,) = _rows(minilm.tokenize([utt], [["one two three four five six seven eight nine ten " * 3]]))
        assert len(row) <= minilm.max_tokens
        assert row[1 : 1 + len(_ids(bert, utt))] == _ids(bert, utt)


def test_context_changes_the_sentence_vector(minilm):
    with torch.no_grad():
        alone = minilm(["i am fine"])
        paired = minilm(["i am fine"], contexts=[["you look terrible"]])
        empty = minilm(["i am fine"], contexts=[[]])
    assert alone.shape == paired.shape == (1, minilm.hidden_size)
    assert not torch.allclose(alone, paired, atol=1e-4)
    torch.testing.assert_close(alone, empty)


# ---- model.features: Whisper states ------------------------------------------------------------------
@pytest.mark.parametrize("seconds,frames", [(3, 1000), (8, 1000), (8.5, 1500), (13, 1500), (13.5, 2000), (14, 2000),
                                            (18, 2000), (18.5, 2500), (28, 3000), (40, 3000), (0, 1000)])
def test_whisper_window_frames_by_hand(seconds, frames):
    from streamer.config import AsrConfig
    from streamer.infer.transcriber import Transcriber

    n = int(seconds * SR)
    assert features.whisper_window_frames(n) == frames
    fake = types.SimpleNamespace(config=AsrConfig())  # window_frames reads only the config
    assert Transcriber.window_frames(fake, n) == frames


def test_asr_window_from_the_command_line_and_its_bounds():
    from streamer.__main__ import build_parser, config_from_args
    from streamer.config import AsrConfig

    assert config_from_args(build_parser().parse_args([])).asr.min_window_s == AsrConfig().min_window_s == 10.0
    assert config_from_args(build_parser().parse_args(["--asr-window", "30"])).asr.min_window_s == 30.0
    from streamer.infer import worker  # a remote worker decodes, so it takes the option too

    assert worker.asr_config(worker.build_parser().parse_args(["--bus", "redis://x"])).min_window_s == 10.0
    assert worker.asr_config(worker.build_parser().parse_args(["--bus", "redis://x", "--asr-window", "15"])).min_window_s == 15.0
    for bad in ({"min_window_s": 0.0}, {"min_window_s": 31.0}, {"window_step_s": 0.0}, {"window_margin_s": -1.0}):
        with pytest.raises(ValueError):
            AsrConfig(**bad)


def test_whisper_window_frames_follows_the_asr_config():
    from streamer.config import AsrConfig
    from streamer.infer.transcriber import Transcriber

    cfg = AsrConfig(min_window_s=5.0, window_margin_s=1.0, window_step_s=2.0)
    fake = types.SimpleNamespace(config=cfg)
    for seconds, frames in [(1, 500), (4.5, 600), (7, 800), (29.5, 3000)]:
        n = int(seconds * SR)
        assert features.whisper_window_frames(n, 5.0, 1.0, 2.0) == frames
        assert Transcriber.window_frames(fake, n) == frames


@pytest.mark.parametrize("n_samples,used", [(16000, 50), (16001, 51), (320, 1), (1, 1), (0, 1),
                                            (30 * 16000, 1500), (31 * 16000, 1500)])
def test_pool_whisper_states_uses_only_the_utterance(n_samples, used):
    rng = np.random.default_rng(0)
    states = rng.standard_normal((1500, 6)).astype(np.float32)
    states[used:] = 1e3  # padding states: must never reach the result
    pooled = features.pool_whisper_states(states, n_samples)
    assert pooled.shape == (12,) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled[:6], states[:used].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[6:], states[:used].std(0), rtol=1e-5, atol=1e-6)


# ---- model.checkpoint: fine-tuned encoder layers in fp16, temperature -----------------------------
@pytest.fixture()
def finetuned(tiny_encoder_dir):
    from model import EmotionModel, ModelConfig

    cfg = ModelConfig(encoder=str(tiny_encoder_dir), encoder_dim=32, encoder_layers_only=True,
                      freeze_encoder=False, whisper_dim=8, text_context=2)
    torch.manual_seed(0)
    model = EmotionModel(cfg)
    with torch.no_grad():  # "fine-tuned": encoder layers moved away from the referenced weights
        for name, p in model.text_encoder.model.named_parameters():
            if not name.startswith("embeddings."):
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _dialogue_scores(model) -> list[dict[str, float]]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    texts = ["Hello.", "You look upset.", "Leave me alone!"]
    audios = [(rng.standard_normal(int(s * SR)) * 0.1).astype(np.float32) for s in (1.0, 1.3, 0.8)]
    whisper = [rng.standard_normal(8).astype(np.float32) for _ in texts]
    contexts = [[], ["Hello."], ["You look upset.", "Hello."]]
    dlg = model.new_dialogue()
    for u in model.encode_utterances(texts, audios, whisper=whisper, contexts=contexts):
        dlg.append(u)
    return [p.scores for p in model.predict([(dlg, i) for i in range(3)])]


def test_finetuned_checkpoint_stores_layers_in_fp16_without_embeddings(finetuned, tmp_path):
    from model import load_checkpoint, save_checkpoint

    path = save_checkpoint(finetuned, tmp_path / "ft.pt")
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any(k.startswith("text_encoder.model.embeddings.") for k in state)
    layers = [k for k in state if k.startswith("text_encoder.model.encoder.layer.")]
    assert layers, "fine-tuned encoder layers are stored"
    assert all(state[k].dtype == torch.float16 for k in layers if state[k].is_floating_point())
    assert all(v.dtype == torch.float32 for k, v in state.items()
               if not k.startswith("text_encoder.") and v.is_floating_point()), "the head stays fp32"
    assert any(k.startswith("whisper_proj.") for k in state)

    loaded = load_checkpoint(path, device="cpu")
    assert loaded.config == finetuned.config
    # reference: the saved model with its encoder layers rounded to fp16 the same way
    reference = finetuned
    with torch.no_grad():
        for name, p in reference.text_encoder.model.named_parameters():
            if not name.startswith("embeddings."):
                p.copy_(p.half().float())
    ref_state, got_state = reference.state_dict(), loaded.state_dict()
    assert ref_state.keys() == got_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), k
    for a, b in zip(_dialogue_scores(reference), _dialogue_scores(loaded)):
        assert a.keys() == b.keys()
        np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-3)


def test_temperature_scales_served_scores_and_keeps_the_label(finetuned, tmp_path):
    from model import EmotionModel, load_checkpoint, save_checkpoint

    base = _dialogue_scores(finetuned)
    for T in (0.5, 3.0):
        hot = EmotionModel(dataclasses.replace(finetuned.config, temperature=T), text_encoder=finetuned.text_encoder)
        hot.load_state_dict(finetuned.state_dict())
        for p1, pT in zip(base, _dialogue_scores(hot)):
            logp = np.log(np.array(list(p1.values()), dtype=np.float64))  # = logits + const
            want = np.exp(logp / T - np.max(logp / T))
            want /= want.sum()
            np.testing.assert_allclose(list(pT.values()), want, atol=1e-5)
            assert max(pT, key=pT.get) == max(p1, key=p1.get)
            if T > 1:
                assert max(pT.values()) < max(p1.values())
            else:
                assert max(pT.values()) > max(p1.values())
    cal = EmotionModel(dataclasses.replace(finetuned.config, temperature=2.0), text_encoder=finetuned.text_encoder)
    cal.load_state_dict(finetuned.state_dict())
    loaded = load_checkpoint(save_checkpoint(cal, tmp_path / "cal.pt"), device="cpu")
    assert loaded.config.temperature == 2.0


# ---- training.datasets: FLAC corpora -----------------------------------------------------------------
def test_load_ravdess_reads_flac(tmp_path):
    import soundfile as sf

    from training import datasets as ds

    actor = tmp_path / "Actor_21"
    actor.mkdir()
    tone = _tone(440, 0.5, 0.3)
    sf.write(actor / "03-01-05-01-01-01-21.flac", tone, SR, format="FLAC")
    sf.write(actor / "03-01-03-02-01-02-21.flac", tone, SR, format="FLAC")
    sf.write(actor / "03-02-05-01-01-01-21.flac", tone, SR, format="FLAC")  # song: skipped
    (actor / "03-01-05-01-01-01-21.txt").write_text("not audio")
    c = ds.load_ravdess(tmp_path)
    assert len(c) == 2
    assert [u.label for u in c.utterances] == ["happy", "angry"]  # sorted by file name
    assert {u.speaker for u in c.utterances} == {"actor21"}
    assert all(u.audio.endswith(".flac") for u in c.utterances)
    audio = features.load_audio(c.utterances[0].audio)
    assert audio.size == tone.size and np.corrcoef(audio, tone)[0, 1] > 0.999
