"""Dataset readers and splits: the real MELD/EmoDB files in ../shared/data, a cp1252 MELD fixture,
and tiny RAVDESS/TESS/CREMA-D/MOSEI/MELD.Raw files built here in their documented layouts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from training import datasets as ds

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MELD_DIR = SHARED / "meld"
EMODB_DIR = SHARED / "emodb"
CP1252 = Path(__file__).resolve().parent / "fixtures" / "training" / "meld_cp1252"


@pytest.fixture(scope="module")
def meld() -> ds.Corpus:
    assert MELD_DIR.is_dir(), f"MELD csv files expected in {MELD_DIR} (CI lays ../shared beside the clone)"
    return ds.load_meld(MELD_DIR)


def test_meld_real_files_counts_order_and_ascii(meld):
    parts = Counter(u.part for u in meld.utterances)
    assert parts == {"train": 9989, "dev": 1109, "test": 2610}
    dialogues = Counter(k.split("/")[0] for k in meld.dialogues)
    assert dialogues == {"train": 1038, "dev": 114, "test": 280}
    assert meld.counts([i for i, u in enumerate(meld.utterances) if u.part == "test"]) == {
        "neutral": 1256, "joy": 402, "anger": 345, "surprise": 281, "sadness": 208, "disgust": 68, "fear": 50}
    assert all(u.text.isascii() for u in meld.utterances)
    first = meld.utterances[meld.dialogues["train/0"][0]]
    assert first.text == "also I was the point person on my company's transition from the KL-5 to GR-6 system."
    assert first.speaker == "Chandler"
    for members in meld.dialogues.values():  # spoken order kept for the Bi-GRU
        pos = [meld.utterances[i].position for i in members]
        assert pos == sorted(pos)


def test_meld_cp1252_copy_reads_like_the_utf8_release(meld):
    old = ds.load_meld(CP1252)
    assert len(old) == 18
    by_uid = {u.uid: u for u in meld.utterances}
    for u in old.utterances:
        assert u.text == by_uid[u.uid].text and u.label == by_uid[u.uid].label
    assert "company's" in old.utterances[0].text


@pytest.mark.parametrize("raw, clean", [
    ("It\u0092s a \u0093test\u0094 \u0085", 'It\'s a "test" ...'),  # cp1252 bytes read as latin-1
    ("Itâ€™s cafÃ© â€” ok", "It's cafe - ok"),  # UTF-8 read as cp1252
    ("He\u2019s \u2018fine\u2019\u2026 caf\u00e9\u00a0now", "He's 'fine'... cafe now"),  # released typographic UTF-8
    ("plain  ASCII ", "plain ASCII"),
])
def test_normalise_text(raw, clean):
    assert ds.normalise_text(raw) == clean


def test_paper_split_reproduces_table1_exactly(meld):
    sp = ds.split_corpus(meld, "paper", seed=0)
    train = sp["train"] + sp["val"]
    assert len(train) == 10_676 and len(sp["test"]) == 2_674
    tr, te = meld.counts(train), meld.counts(sp["test"])
    assert (tr["neutral"], te["neutral"]) == (5_148, 1_288)
    assert (tr["joy"], te["joy"]) == (1_846, 462)
    assert "fear" not in tr and "fear" not in te
    assert set(train).isdisjoint(sp["test"]) and set(sp["train"]).isdisjoint(sp["val"])
    # per class: the test side is ceil(20 %) of the class, whatever the seed
    assert meld.counts(ds.split_corpus(meld, "paper", seed=7)["test"]) == te


def test_paper_dialogues_and_official_splits(meld):
    sp = ds.split_corpus(meld, "paper-dialogues", seed=0)
    dlg = lambda idx: {meld.utterances[i].dialogue for i in idx}  # noqa: E731
    assert dlg(sp["test"]).isdisjoint(dlg(sp["train"]) | dlg(sp["val"]))
    n = len(sp["train"]) + len(sp["val"]) + len(sp["test"])
    assert n == 13_350 and 0.17 < len(sp["test"]) / n < 0.23
    off = ds.split_corpus(meld, "official")
    assert [len(off[k]) for k in ("train", "val", "test")] == [9989, 1109, 2610]
    with pytest.raises(ds.DatasetError):
        ds.split_corpus(meld, "random")


def test_emodb_real_files_and_speaker_disjoint_split():
    c = ds.load_emodb(EMODB_DIR)
    assert len(c) == 535 and c.labels == ds.EMODB_LABELS
    assert c.counts() == {"anger": 127, "boredom": 81, "neutral": 79, "happiness": 71, "fear": 69, "sadness": 62, "disgust": 46}
    assert len({u.speaker for u in c.utterances}) == 10
    sp = ds.split_corpus(c, "speakers", seed=0)
    spk = {k: {c.utterances[i].speaker for i in v} for k, v in sp.items()}
    assert spk["train"].isdisjoint(spk["test"]) and spk["val"].isdisjoint(spk["test"]) and spk["train"].isdisjoint(spk["val"])
    assert sum(len(v) for v in sp.values()) == 535
    # MODEL_CARD.md reports held-out speakers 11 and 13 (validation 12): the seed-0 split
    assert spk == {"train": {"03", "08", "09", "10", "14", "15", "16"}, "val": {"12"}, "test": {"11", "13"}}
    named = ds.split_corpus(c, "speakers:03+16")
    assert {c.utterances[i].speaker for i in named["test"]} == {"03", "16"}
    assert set(ds.TO_MELD["emodb"].values()) <= set(ds.MELD_LABELS)


def _wav(path: Path, seconds: float = 0.6, sr: int = 16_000, freq: float = 220.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


def test_ravdess_tess_cremad_by_file_names(tmp_path):
    rav = tmp_path / "ravdess"
    for actor in (1, 2, 3, 12):
        for emo in ("01", "02", "05", "08"):
            _wav(rav / f"Actor_{actor:02d}" / f"03-01-{emo}-01-02-01-{actor:02d}.wav")
    _wav(rav / "Actor_01" / "03-02-05-01-02-01-01.wav")  # song: skipped
    _wav(rav / "Actor_01" / "02-01-05-01-02-01-01.wav")  # video-only: skipped
    c = ds.load_ravdess(rav)
    assert len(c) == 16
    assert {u.label for u in c.utterances} == {"neutral", "calm", "angry", "surprised"}
    assert {u.speaker for u in c.utterances} == {"actor01", "actor02", "actor03", "actor12"}
    assert ds.TO_MELD["ravdess"]["calm"] == "neutral" and ds.TO_MELD["ravdess"]["surprised"] == "surprise"

    tess = tmp_path / "tess"
    for spk in ("OAF", "YAF"):
        for word in ("back", "bar"):
            for emo in ("angry", "ps", "happy"):
                _wav(tess / f"{spk}_{emo}" / f"{spk}_{word}_{emo}.wav")
    t = ds.load_tess(tess)
    assert len(t) == 12 and {u.speaker for u in t.utterances} == {"OAF", "YAF"}
    sp = ds.split_corpus(t, "speakers:YAF")
    assert {t.utterances[i].speaker for i in sp["test"]} == {"YAF"} and sp["val"]  # val carved from train
    assert {t.utterances[i].speaker for i in sp["train"] + sp["val"]} == {"OAF"}

    cre = tmp_path / "cremad"
    for actor in (1001, 1002, 1003, 1004, 1005):
        for emo in ("ANG", "HAP", "NEU"):
            _wav(cre / f"{actor}_DFA_{emo}_XX.wav")
    _wav(cre / "notes_about_files.wav")
    k = ds.load_cremad(cre)
    assert len(k) == 15 and {u.label for u in k.utterances} == {"anger", "happy", "neutral"}
    sp = ds.split_corpus(k, "speakers", seed=0)
    spk = {p: {k.utterances[i].speaker for i in v} for p, v in sp.items()}
    assert spk["test"] and spk["train"].isdisjoint(spk["test"]) and spk["val"].isdisjoint(spk["test"])
    with pytest.raises(ds.DatasetError):
        ds.load_cremad(tmp_path / "ravdess")


def _csd(path: Path, name: str, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        root = f.create_group(name)
        g = root.create_group("data")
        for vid, (feat, iv) in data.items():
            v = g.create_group(vid)
            v.create_dataset("features", data=feat)
            v.create_dataset("intervals", data=iv)
        meta = root.create_group("metadata")
        meta.attrs["root name"] = name
    return path


def test_mosei_csd_reader(tmp_path):
    # two segments of video "vidA" (listed out of order) and one all-zero segment that is skipped
    labels = {
        "vidA": (np.array([[0.5, 0, 0, 0, 0, 0, 0], [1.0, 2.0, 0, 0, 0.3, 0, 0], [-1.0, 0, 1.0, 0.6, 0, 0, 0]], np.float32),
                 np.array([[4.0, 5.0], [0.0, 1.5], [2.0, 3.0]])),
        "vidB": (np.array([[0.0, 0, 0, 0, 0, 0, 1.7]], np.float32), np.array([[0.0, 1.0]])),
    }
    words = {"vidA": (np.array([[b"I"], [b"am"], [b"sp"], [b"happy"], [b"so"], [b"sad"]]),
                      np.array([[0.1, 0.3], [0.3, 0.5], [0.5, 0.6], [0.6, 1.2], [2.1, 2.4], [2.4, 2.9]]))}
    lab = _csd(tmp_path / "CMU_MOSEI_Labels.csd", "All Labels", labels)
    wrd = _csd(tmp_path / "CMU_MOSEI_TimestampedWords.csd", "words", words)
    _wav(tmp_path / "wav" / "vidA.wav", seconds=6.0)
    c = ds.load_spec(f"mosei:{lab},words={wrd},wav={tmp_path / 'wav'}")
    assert [u.label for u in c.utterances] == ["happy", "sad", "fear"]
    a0, a1 = c.utterances[0], c.utterances[1]
    assert a0.text == "I am happy" and a0.span == (0.0, 1.5) and a0.audio and a0.dialogue == "vidA"
    assert a1.text == "so sad" and a1.position > a0.position
    assert c.utterances[2].audio is None and c.utterances[2].text == ""
    assert ds.TO_MELD["mosei"]["happy"] == "joy"
    from training.cache import log_mels

    mels = log_mels(c, tmp_path / "cache")
    assert mels[0].shape[1] == pytest.approx(151, abs=2) and mels[2] is None  # 1.5 s at 100 frames/s
    with pytest.raises(ds.DatasetError):
        ds.read_csd(_bad_h5(tmp_path))


def _bad_h5(tmp_path: Path) -> Path:
    import h5py

    p = tmp_path / "not_a_sequence.csd"
    with h5py.File(p, "w") as f:
        f.create_group("a")
        f.create_group("b")
    return p


def _mp4(path: Path, seconds: float = 1.0, sr: int = 44_100) -> Path:
    """A tiny AAC-in-MP4 file like MELD.Raw's, written with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=sr)
        stream.layout = "stereo"
        n = int(seconds * sr)
        t = np.arange(n) / sr
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        frame_len = 1024
        for s in range(0, n, frame_len):
            chunk = np.stack([tone[s : s + frame_len]] * 2)  # (2, n) planar
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="stereo")
            frame.sample_rate = sr
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    return path


def test_meld_raw_mp4_audio_extracted_once_to_16k(tmp_path):
    raw = tmp_path / "MELD.Raw"
    _mp4(raw / "train_splits" / "dia0_utt0.mp4", seconds=1.0)
    _wav(raw / "output_repeated_splits_test" / "dia0_utt1.wav", seconds=0.7)
    c = ds.load_meld(CP1252, raw_dir=raw, audio_cache=tmp_path / "cache")
    by_uid = {u.uid: u for u in c.utterances}
    a = by_uid["meld/train/dia0_utt0"].audio
    assert a is not None and a.endswith("dia0_utt0.wav") and str(tmp_path / "cache") in a
    audio, sr = sf.read(a)
    assert sr == 16_000 and audio.ndim == 1 and 0.95 < len(audio) / sr < 1.1
    assert np.abs(audio).max() > 0.1  # the tone survived decoding
    assert by_uid["meld/test/dia0_utt1"].audio.endswith("dia0_utt1.wav")
    assert by_uid["meld/dev/dia0_utt1"].audio is None  # absent: the speech modality is masked
    mtime = Path(a).stat().st_mtime_ns
    ds.load_meld(CP1252, raw_dir=raw, audio_cache=tmp_path / "cache")
    assert Path(a).stat().st_mtime_ns == mtime  # extracted once, then reused


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(ds.DatasetError, match="kind:PATH"):
        ds.load_spec("meld")
    with pytest.raises(ds.DatasetError, match="unknown dataset kind"):
        ds.load_spec(f"iemocap:{tmp_path}")
    with pytest.raises(ds.DatasetError, match="MELD file missing"):
        ds.load_meld(tmp_path)


def test_meld_held_out_seasons_split(meld):
    sp = ds.split_corpus(meld, "seasons:8+9")
    season = lambda idx: {meld.utterances[i].season for i in idx}  # noqa: E731
    assert season(sp["test"]) == {8, 9} and not season(sp["train"]) & {8, 9} and not season(sp["val"]) & {8, 9}
    assert {meld.utterances[i].part for i in sp["train"]} == {"train"} and {meld.utterances[i].part for i in sp["val"]} == {"dev"}
    assert {meld.utterances[i].part for i in sp["test"]} == {"train", "dev"}  # official test stays the report
    assert len(sp["test"]) == 1108 + 490 + 203 + 31 and len(sp["train"]) == 9989 - 1108 - 490
    dlg = lambda idx: {meld.utterances[i].dialogue for i in idx}  # noqa: E731
    assert not dlg(sp["test"]) & (dlg(sp["train"]) | dlg(sp["val"]))  # a dialogue never straddles seasons
    with pytest.raises(ds.DatasetError, match="seasons"):
        ds.split_corpus(meld, "seasons:12")
