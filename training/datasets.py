"""Corpora in their released formats -> one in-memory shape (`Corpus`), and the named splits.

Readers: MELD `{train,dev,test}_sent_emo.csv` (+ optional MELD.Raw `diaX_uttY.mp4` folders),
EmoDB (`labels.csv` + `wav/`), RAVDESS / TESS / CREMA-D by their file-name conventions, and
CMU-MOSEI computational sequences (`.csd`, HDF5) with its WAV folder. Nothing is re-exported: the
loaders read the files as the dataset authors ship them.

Every corpus is a list of dialogues of utterances in spoken order. Acted corpora are one utterance
per "dialogue" (no context); MOSEI videos are dialogues of their segments.
"""

from __future__ import annotations

import csv
import hashlib
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from model import MELD_LABELS
from model import features

# ---- label sets and mappings onto MELD's seven labels ------------------------------------------
EMODB_LABELS: tuple[str, ...] = ("anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral")
EMODB_CODES = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear", "F": "happiness", "T": "sadness", "N": "neutral"}
RAVDESS_CODES = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
                 "07": "disgust", "08": "surprised"}
TESS_NAMES = ("angry", "disgust", "fear", "happy", "neutral", "ps", "sad")
CREMAD_CODES = {"ANG": "anger", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
MOSEI_EMOTIONS: tuple[str, ...] = ("happy", "sad", "anger", "surprise", "disgust", "fear")  # csd columns 1..6

# Native label -> MELD label. Boredom and calm are low-arousal, no-valence states: neutral is the
# nearest MELD class. TESS "ps" is "pleasant surprise".
TO_MELD: dict[str, dict[str, str]] = {
    "emodb": {"anger": "anger", "boredom": "neutral", "disgust": "disgust", "fear": "fear",
              "happiness": "joy", "sadness": "sadness", "neutral": "neutral"},
    "ravdess": {"neutral": "neutral", "calm": "neutral", "happy": "joy", "sad": "sadness", "angry": "anger",
                "fearful": "fear", "disgust": "disgust", "surprised": "surprise"},
    "tess": {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "joy", "neutral": "neutral",
             "ps": "surprise", "sad": "sadness"},
    "cremad": {"anger": "anger", "disgust": "disgust", "fear": "fear", "happy": "joy", "neutral": "neutral",
               "sad": "sadness"},
    "mosei": {"happy": "joy", "sad": "sadness", "anger": "anger", "surprise": "surprise", "disgust": "disgust",
              "fear": "fear"},
    "meld": {lab: lab for lab in MELD_LABELS},
}
NATIVE_LABELS: dict[str, tuple[str, ...]] = {
    "emodb": EMODB_LABELS,
    "ravdess": tuple(RAVDESS_CODES.values()),
    "tess": TESS_NAMES,
    "cremad": tuple(CREMAD_CODES.values()),
    "mosei": MOSEI_EMOTIONS,
    "meld": MELD_LABELS,
}
MELD_SPLIT_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
ACTED_KINDS = ("emodb", "ravdess", "tess", "cremad")


class DatasetError(ValueError):
    """A dataset folder or file does not have the documented layout."""


@dataclass(frozen=True)
class Utterance:
    """One labelled utterance. `label` is in the corpus's native label set."""

    uid: str
    text: str
    label: str
    speaker: str
    dialogue: str  # key of its dialogue in Corpus.dialogues
    position: int  # index inside the dialogue
    audio: str | None = None  # path of a 16 kHz-decodable audio file, if any
    part: str = ""  # released part (MELD train/dev/test), "" when the corpus has none
    span: tuple[float, float] | None = None  # seconds inside `audio` (MOSEI segments)
    season: int = 0  # MELD: the show's season (1-9); 0 when the corpus has none
    sentiment: str = ""  # MELD: positive | neutral | negative; "" when the corpus has none


@dataclass
class Corpus:
    """Utterances of one dataset, grouped into ordered dialogues."""

    kind: str  # meld | emodb | ravdess | tess | cremad | mosei
    labels: tuple[str, ...]  # native label set
    utterances: list[Utterance]
    dialogues: dict[str, list[int]] = field(default_factory=dict)  # key -> utterance indices in order

    def __post_init__(self) -> None:
        if not self.dialogues:
            groups: dict[str, list[int]] = defaultdict(list)
            for i, u in enumerate(self.utterances):
                groups[u.dialogue].append(i)
            self.dialogues = {k: sorted(v, key=lambda i: self.utterances[i].position) for k, v in groups.items()}

    def __len__(self) -> int:
        return len(self.utterances)

    def counts(self, indices: Iterable[int] | None = None) -> Counter:
        idx = range(len(self.utterances)) if indices is None else indices
        return Counter(self.utterances[i].label for i in idx)

    @property
    def has_text(self) -> bool:
        return any(u.text for u in self.utterances)

    @property
    def has_audio(self) -> bool:
        return any(u.audio for u in self.utterances)


# ---- text normalisation ---------------------------------------------------------------------
_ASCII_PUNCT = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'", "\u0060": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-", "\u2026": "...", "\u00a0": " ",
    "\u2009": " ", "\u200b": "",
}
_MOJIBAKE_HINT = re.compile("[\u00c2\u00c3\u00e2][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u2122]")


def normalise_text(text: str) -> str:
    """MELD text as released (typographic UTF-8) or from other releases (cp1252 mojibake) -> ASCII.

    Handles: C1 control characters that are cp1252 bytes read as latin-1 (U+0092 -> '), UTF-8 read
    as cp1252 ('â€™' -> '), typographic quotes/dashes/ellipses, accents (é -> e)."""
    if any("\u0080" <= c <= "\u009f" for c in text):  # cp1252 bytes decoded as latin-1
        text = "".join(_c1_to_cp1252(c) for c in text)
    if _MOJIBAKE_HINT.search(text):  # UTF-8 bytes decoded as cp1252 (or latin-1)
        for enc in ("cp1252", "latin-1"):
            try:
                text = text.encode(enc).decode("utf-8")
                break
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
    text = "".join(_ASCII_PUNCT.get(c, c) for c in text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"\s+", " ", text).strip()


def _c1_to_cp1252(c: str) -> str:
    if "\u0080" <= c <= "\u009f":
        try:
            return bytes([ord(c)]).decode("cp1252")
        except UnicodeDecodeError:
            return ""
    return c


def read_text_file(path: Path) -> str:
    """UTF-8 (with or without BOM) if it decodes, else cp1252 (older MELD copies)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


# ---- MELD ----------------------------------------------------------------------------------
def load_meld(root: str | Path, raw_dir: str | Path | None = None, audio_cache: str | Path | None = None) -> Corpus:
    """Read MELD's train/dev/test `*_sent_emo.csv` from `root`. With `raw_dir` (MELD.Raw: folders
    train_splits/, dev_splits_complete/, output_repeated_splits_test/ of diaX_uttY.mp4), each
    utterance's audio is extracted once to 16 kHz mono WAV under `audio_cache`."""
    root = Path(root)
    utts: list[Utterance] = []
    for part in ("train", "dev", "test"):
        path = root / f"{part}_sent_emo.csv"
        if not path.is_file():
            raise DatasetError(f"MELD file missing: {path} (expected {{train,dev,test}}_sent_emo.csv)")
        rows = list(csv.DictReader(read_text_file(path).splitlines()))
        if rows and not {"Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID"} <= set(rows[0]):
            raise DatasetError(f"{path}: unexpected columns {list(rows[0])}")
        for r in rows:
            label = r["Emotion"].strip().lower()
            if label not in MELD_LABELS:
                raise DatasetError(f"{path}: unknown emotion {label!r}")
            d, u = int(r["Dialogue_ID"]), int(r["Utterance_ID"])
            audio = None
            if raw_dir is not None:
                audio = _meld_audio(Path(raw_dir), part, d, u, audio_cache)
            utts.append(Utterance(
                uid=f"meld/{part}/dia{d}_utt{u}", text=normalise_text(r["Utterance"]), label=label,
                speaker=normalise_text(r["Speaker"]), dialogue=f"{part}/{d}", position=u, audio=audio, part=part,
                season=int(r.get("Season") or 0), sentiment=(r.get("Sentiment") or "").strip().lower(),
            ))
    return Corpus("meld", MELD_LABELS, utts)


def _meld_audio(raw_dir: Path, part: str, dia: int, utt: int, cache: str | Path | None) -> str | None:
    name = f"dia{dia}_utt{utt}"
    for folder in (raw_dir / MELD_SPLIT_DIRS[part], raw_dir / part, raw_dir):
        for ext in (".mp4", ".wav", ".flac"):
            src = folder / f"{name}{ext}"
            if src.is_file():
                if ext != ".mp4":
                    return str(src)
                cache_dir = Path(cache) if cache is not None else Path("cache") / "audio"
                dst = cache_dir / "meld" / part / f"{name}.wav"
                return str(extract_audio(src, dst))
    return None  # MELD.Raw lacks a few utterances: the speech modality is masked for them


def extract_audio(src: str | Path, dst: str | Path, sr: int = features.SAMPLE_RATE) -> Path:
    """Decode the audio track of any container PyAV (FFmpeg) reads to mono float WAV at `sr`, once."""
    import av
    import soundfile as sf

    dst = Path(dst)
    if dst.is_file() and dst.stat().st_mtime >= Path(src).stat().st_mtime:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    chunks: list[np.ndarray] = []
    with av.open(str(src)) as container:
        if not container.streams.audio:
            raise DatasetError(f"{src} has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):  # flush
            chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    tmp = dst.with_name(dst.stem + ".part.wav")
    sf.write(tmp, audio, sr, subtype="FLOAT")
    tmp.replace(dst)
    return dst


# ---- acted speech corpora ------------------------------------------------------------------
def load_emodb(root: str | Path) -> Corpus:
    """EmoDB: `labels.csv` (file,speaker,text_id,emotion,emotion_code) + `wav/`; falls back to
    decoding the file names (speaker 1-2, text 3-5, emotion code 6) when labels.csv is absent."""
    root = Path(root)
    wav = root / "wav" if (root / "wav").is_dir() else root
    rows: list[tuple[str, str, str]] = []
    if (root / "labels.csv").is_file():
        for r in csv.DictReader(read_text_file(root / "labels.csv").splitlines()):
            rows.append((r["file"], r["speaker"].zfill(2), r["emotion"]))
    else:
        for p in sorted(wav.glob("*.wav")):
            if len(p.stem) >= 6 and p.stem[5] in EMODB_CODES:
                rows.append((p.name, p.stem[:2], EMODB_CODES[p.stem[5]]))
    if not rows:
        raise DatasetError(f"no EmoDB clips found in {root}")
    utts = []
    for name, spk, emo in rows:
        if emo not in EMODB_LABELS:
            raise DatasetError(f"EmoDB {name}: unknown emotion {emo!r}")
        path = wav / name
        if not path.is_file():
            raise DatasetError(f"EmoDB clip listed but missing: {path}")
        utts.append(_acted("emodb", name, emo, spk, str(path)))
    return Corpus("emodb", EMODB_LABELS, utts)


def load_ravdess(root: str | Path) -> Corpus:
    """RAVDESS speech audio: `MM-VV-EE-II-SS-RR-AA.wav` (modality, vocal channel 01 speech / 02 song,
    emotion 01-08, intensity, statement, repetition, actor). Song and video-only files are skipped."""
    utts = []
    for p in audio_files(root):
        parts = p.stem.split("-")
        if len(parts) != 7 or not all(x.isdigit() for x in parts):
            continue
        modality, channel, emo, _, _, _, actor = parts
        if modality == "02" or channel != "01" or emo not in RAVDESS_CODES:
            continue
        utts.append(_acted("ravdess", p.name, RAVDESS_CODES[emo], f"actor{int(actor):02d}", str(p)))
    return _nonempty(Corpus("ravdess", NATIVE_LABELS["ravdess"], utts), root)


def load_tess(root: str | Path) -> Corpus:
    """TESS: `OAF_back_angry.wav` / `YAF_...`: speaker (OAF older, YAF younger talker), word, emotion."""
    utts = []
    for p in audio_files(root):
        parts = p.stem.split("_")
        if len(parts) < 3:
            continue
        emo = parts[-1].lower()
        if emo not in TESS_NAMES:
            continue
        utts.append(_acted("tess", p.name, emo, parts[0].upper(), str(p)))
    return _nonempty(Corpus("tess", TESS_NAMES, utts), root)


def load_cremad(root: str | Path) -> Corpus:
    """CREMA-D: `1001_DFA_ANG_XX.wav`: actor id, sentence code, emotion code, intensity."""
    utts = []
    for p in audio_files(root):
        parts = p.stem.split("_")
        if len(parts) != 4 or not parts[0].isdigit() or parts[2] not in CREMAD_CODES:
            continue
        utts.append(_acted("cremad", p.name, CREMAD_CODES[parts[2]], parts[0], str(p)))
    return _nonempty(Corpus("cremad", NATIVE_LABELS["cremad"], utts), root)


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".opus")  # what soundfile/libsndfile reads


def audio_files(root: str | Path) -> list[Path]:
    """Every audio file under `root` in a format soundfile reads, sorted (the acted corpora are
    released as WAV; copies re-encoded to FLAC or another format load the same)."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def _acted(kind: str, name: str, label: str, speaker: str, path: str) -> Utterance:
    uid = f"{kind}/{name}"
    return Utterance(uid=uid, text="", label=label, speaker=speaker, dialogue=uid, position=0, audio=path)


def _nonempty(corpus: Corpus, root: str | Path) -> Corpus:
    if not corpus.utterances:
        raise DatasetError(f"no {corpus.kind} files with the documented name pattern under {root}")
    return corpus


# ---- CMU-MOSEI -----------------------------------------------------------------------------
def read_csd(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A CMU Multimodal SDK computational sequence: HDF5 `/<name>/data/<video>/{features,intervals}`.
    Returns video id -> (features (N, D), intervals (N, 2) seconds)."""
    import h5py

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        roots = list(f.keys())
        if len(roots) != 1 or "data" not in f[roots[0]]:
            raise DatasetError(f"{path}: not a computational sequence (top-level groups {roots})")
        data = f[roots[0]]["data"]
        for vid in data:
            out[vid] = (np.asarray(data[vid]["features"][()]), np.asarray(data[vid]["intervals"][()], dtype=np.float64))
    return out


def load_mosei(labels_csd: str | Path, words_csd: str | Path | None = None, wav_dir: str | Path | None = None) -> Corpus:
    """CMU-MOSEI per the paper: six emotions, each segment labelled with its dominant emotion
    (largest intensity among happy, sad, anger, surprise, disgust, fear; segments with all zero are
    skipped). Text from the TimestampedWords sequence (words inside the segment), audio from
    `wav_dir/<video>.wav` cut to the segment's interval."""
    labels = read_csd(labels_csd)
    words = read_csd(words_csd) if words_csd is not None else {}
    utts = []
    for vid in sorted(labels):
        feats, ivals = labels[vid]
        if feats.ndim != 2 or feats.shape[1] < 7:
            raise DatasetError(f"{labels_csd}: {vid} has features {feats.shape}, expected (N, 7) [sentiment + 6 emotions]")
        order = np.argsort(ivals[:, 0], kind="stable")
        wav = Path(wav_dir) / f"{vid}.wav" if wav_dir is not None else None
        for pos, k in enumerate(order):
            emo = feats[k, 1:7]
            if not np.any(emo > 0):
                continue
            start, end = float(ivals[k, 0]), float(ivals[k, 1])
            text = ""
            if vid in words:
                w_feat, w_iv = words[vid]
                inside = (w_iv[:, 0] >= start - 1e-6) & (w_iv[:, 1] <= end + 1e-6)
                toks = [_word(x) for x in w_feat[inside].reshape(-1)]
                text = normalise_text(" ".join(t for t in toks if t and t != "sp"))
            utts.append(Utterance(
                uid=f"mosei/{vid}[{pos}]", text=text, label=MOSEI_EMOTIONS[int(np.argmax(emo))], speaker=vid,
                dialogue=vid, position=pos, audio=str(wav) if wav is not None and wav.is_file() else None,
                span=(start, end),
            ))
    return _nonempty(Corpus("mosei", MOSEI_EMOTIONS, utts), labels_csd)


def _word(x: object) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


# ---- data specs ----------------------------------------------------------------------------
def load_spec(spec: str, audio_cache: str | Path | None = None) -> Corpus:
    """`kind:PATH[,key=value...]`, e.g. `meld:/data/meld,raw=/data/MELD.Raw`, `emodb:/data/emodb`,
    `mosei:/data/CMU_MOSEI_Labels.csd,words=/data/CMU_MOSEI_TimestampedWords.csd,wav=/data/WAV_16000`."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise DatasetError(f"data spec {spec!r} must look like kind:PATH (kinds: meld, emodb, ravdess, tess, cremad, mosei)")
    path, *opts = rest.split(",")
    kw = {}
    for o in opts:
        k, eq, v = o.partition("=")
        if not eq:
            raise DatasetError(f"data spec option {o!r} must be key=value")
        kw[k] = v
    kind = kind.lower().replace("-", "")
    if kind == "meld":
        return load_meld(path, raw_dir=kw.get("raw"), audio_cache=audio_cache)
    if kind == "mosei":
        return load_mosei(path, words_csd=kw.get("words"), wav_dir=kw.get("wav"))
    loaders = {"emodb": load_emodb, "ravdess": load_ravdess, "tess": load_tess, "cremad": load_cremad}
    if kind not in loaders:
        raise DatasetError(f"unknown dataset kind {kind!r}")
    return loaders[kind](path)


# ---- splits --------------------------------------------------------------------------------
PAPER_TABLE1 = {  # Makhmudov et al. (2024), Table 1: MELD without fear, train / test
    "train": 10_676, "test": 2_674, "neutral": (5_148, 1_288), "joy": (1_846, 462),
}


def split_corpus(corpus: Corpus, split: str, seed: int = 0) -> dict[str, list[int]]:
    """Named splits -> {train, val, test} lists of utterance indices (the targets; context windows
    still read neighbouring utterances of the same dialogue, as live serving would).

    meld: `official` (train/dev/test as released), `paper` (all pooled, fear dropped, each class
    split 80/20 -> Table 1's counts exactly; val = 10% of train, stratified), `paper-dialogues`
    (same pool, 80/20 by whole dialogues), `seasons:8+9` (held-out seasons: train = official train of
    the other seasons, val = official dev of the other seasons, test = official train + dev of the
    named seasons; official test is left out, so it stays the report and is never a choice). Acted corpora and MOSEI: `speakers` (speaker-disjoint,
    about 70/10/20 of the speakers), or `speakers:TEST[+TEST..]` to name the held-out speakers."""
    if corpus.kind == "meld":
        if split == "official":
            by_part: dict[str, list[int]] = defaultdict(list)
            for i, u in enumerate(corpus.utterances):
                by_part[u.part].append(i)
            return {"train": by_part["train"], "val": by_part["dev"], "test": by_part["test"]}
        if split in ("paper", "paper-dialogues"):
            pool = [i for i, u in enumerate(corpus.utterances) if u.label != "fear"]
            if split == "paper":
                train, test = _stratified(corpus, pool, 0.2, seed)
            else:
                train, test = _grouped(corpus, pool, 0.2, seed, key=lambda u: u.dialogue)
            train, val = _stratified(corpus, train, 0.1, seed + 1)
            return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
        if split.startswith("seasons:"):
            held = {int(x) for x in split.split(":", 1)[1].split("+")}
            have = {u.season for u in corpus.utterances}
            if not held or not held <= have:
                raise DatasetError(f"unknown MELD seasons {sorted(held - have)} (have {sorted(have)})")
            out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
            for i, u in enumerate(corpus.utterances):
                if u.part != "test":
                    out["test" if u.season in held else "train" if u.part == "train" else "val"].append(i)
            return out
        raise DatasetError(f"unknown MELD split {split!r} (official, paper, paper-dialogues, seasons:S[+S..])")
    if split == "speakers" or split.startswith("speakers:"):
        speakers = sorted({u.speaker for u in corpus.utterances})
        if split.startswith("speakers:"):
            test_spk = set(split.split(":", 1)[1].split("+"))
            if not test_spk <= set(speakers):
                raise DatasetError(f"unknown speakers {sorted(test_spk - set(speakers))} (have {speakers})")
        else:
            test_spk = None
        return _speaker_split(corpus, speakers, test_spk, seed)
    raise DatasetError(f"unknown split {split!r} for {corpus.kind} (use speakers or speakers:A+B)")


def _stratified(corpus: Corpus, pool: Sequence[int], test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Per-class train_test_split: each class gives ceil(test_size * n) to test (sklearn's rule)."""
    from sklearn.model_selection import train_test_split

    by_label: dict[str, list[int]] = defaultdict(list)
    for i in pool:
        by_label[corpus.utterances[i].label].append(i)
    train, test = [], []
    for label in sorted(by_label):
        tr, te = train_test_split(by_label[label], test_size=test_size, random_state=seed, shuffle=True)
        train += tr
        test += te
    return train, test


def _grouped(corpus: Corpus, pool: Sequence[int], test_size: float, seed: int, key) -> tuple[list[int], list[int]]:
    groups = sorted({key(corpus.utterances[i]) for i in pool})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    n_test = int(np.ceil(test_size * len(groups)))
    test_groups = {groups[k] for k in order[:n_test]}
    train = [i for i in pool if key(corpus.utterances[i]) not in test_groups]
    test = [i for i in pool if key(corpus.utterances[i]) in test_groups]
    return train, test


def _speaker_split(corpus: Corpus, speakers: list[str], test_spk: set[str] | None, seed: int) -> dict[str, list[int]]:
    if len(speakers) < 2:
        raise DatasetError(f"{corpus.kind}: a speaker-disjoint split needs >= 2 speakers, have {speakers}")
    rng = np.random.default_rng(seed)
    rest = list(speakers)
    if test_spk is None:
        n_test = max(1, round(0.2 * len(speakers)))
        test_spk = {rest[k] for k in rng.permutation(len(rest))[:n_test]}
    rest = [s for s in rest if s not in test_spk]
    # one validation speaker (for early stopping) when at least two remain for training
    val_spk = {rest[int(rng.integers(len(rest)))]} if len(rest) >= 3 else set()
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, u in enumerate(corpus.utterances):
        part = "test" if u.speaker in test_spk else "val" if u.speaker in val_spk else "train"
        out[part].append(i)
    if not out["val"]:  # too few speakers: validate on a stratified tenth of train (stated in reports)
        out["train"], out["val"] = _stratified(corpus, out["train"], 0.1, seed + 1)
    return out


def fingerprint(corpus: Corpus) -> str:
    """Short hash of the corpus contents (ids, texts, labels): goes into caches and reports."""
    h = hashlib.sha1()
    for u in corpus.utterances:
        h.update(f"{u.uid}\t{u.text}\t{u.label}\t{u.audio}\t{u.span}\n".encode())
    return h.hexdigest()[:12]
