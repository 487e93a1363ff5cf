"""Acted speech from two corpora as one table, and the splits that hold out what real use changes.

RAVDESS (English, 24 actors, two sentences) and EmoDB (German, 10 speakers, ten sentences) are read
into one corpus with a union label set (`SPEECH_LABELS`: RAVDESS's eight plus EmoDB's boredom), so
one speech branch can learn from both. Every clip keeps its corpus, speaker and sentence.

The splits (`split(name)`) answer three questions, each on data no choice was made on:
- held-out sentence: RAVDESS actors 1-16 saying statement 01 ("Kids are talking by the door") train,
  actors 17-20 saying statement 02 ("Dogs are sitting by the door") validate, actors 21-24 saying
  statement 02 test (`sentence01`), and the reverse (`sentence02`);
- held-out corpus: train on RAVDESS (statement 01, actors 1-16; validation as above) and test on all
  of EmoDB and on the held-out sentence of actors 21-24 (`to-emodb`), or train on EmoDB (validation speaker 12) and test on all RAVDESS actors
  (`to-ravdess`);
- what ships (`ship`): RAVDESS statement 01 of actors 1-16 + EmoDB speakers other than 11-13;
  validation RAVDESS actors 17-20 statement 02 + EmoDB speaker 12; tests RAVDESS actors 21-24
  (statement 02: a held-out sentence and held-out actors; statement 01: held-out actors only, the
  number earlier versions reported) and EmoDB speakers 11 + 13.

Cross-corpus scores use MELD's labels (calm and boredom -> neutral): EmoDB has no surprise, so
`to-ravdess` leaves RAVDESS's surprised clips out of its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from model.config import MELD_LABELS
from training.datasets import Corpus, Utterance, load_emodb, load_ravdess
from training.speech_cache import SpeechFeatures, build

SPEECH_LABELS: tuple[str, ...] = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised", "boredom")
RAVDESS_LABELS = SPEECH_LABELS[:8]
FROM_EMODB = {"anger": "angry", "boredom": "boredom", "disgust": "disgust", "fear": "fearful", "happiness": "happy",
              "sadness": "sad", "neutral": "neutral"}
TO_MELD_LABEL = {"neutral": "neutral", "calm": "neutral", "boredom": "neutral", "happy": "joy", "sad": "sadness",
                 "angry": "anger", "fearful": "fear", "disgust": "disgust", "surprised": "surprise"}
STATEMENTS = {1: "Kids are talking by the door.", 2: "Dogs are sitting by the door."}
EMODB_VAL, EMODB_TEST = ("12",), ("11", "13")
SPLITS = ("ship", "sentence01", "sentence02", "to-emodb", "to-ravdess")


@dataclass
class Acted:
    """RAVDESS + EmoDB clips: `corpus` (union labels) and, per clip, its source and sentence."""

    corpus: Corpus
    source: np.ndarray  # (N,) "ravdess" | "emodb"
    speaker: np.ndarray  # (N,) actor number (RAVDESS) or EmoDB speaker id, as str
    sentence: np.ndarray  # (N,) RAVDESS statement 1/2; EmoDB text id (a01 ... b10)
    y: np.ndarray  # (N,) index into SPEECH_LABELS
    y_meld: np.ndarray  # (N,) index into MELD_LABELS

    def where(self, source: str, speakers: Sequence[str] | None = None, sentence: object = None) -> list[int]:
        keep = self.source == source
        if speakers is not None:
            keep &= np.isin(self.speaker, list(speakers))
        if sentence is not None:
            keep &= self.sentence == str(sentence)
        return [int(i) for i in np.flatnonzero(keep)]


def actors(lo: int, hi: int) -> list[str]:
    return [str(a) for a in range(lo, hi + 1)]


def actor_list(spec: str) -> tuple[str, ...]:
    """'21-24' or '3' or '1,5-6' -> RAVDESS actor numbers as Acted.speaker holds them."""
    out: list[str] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += actors(int(lo), int(hi or lo))
    return tuple(out)


def load(ravdess_dir: str | Path, emodb_dir: str | Path | None) -> Acted:
    """Both corpora (EmoDB optional: None leaves it out) as one Acted table."""
    rav = load_ravdess(ravdess_dir)
    utts: list[Utterance] = []
    source, speaker, sentence = [], [], []
    for u in rav.utterances:
        utts.append(u)
        source.append("ravdess")
        speaker.append(str(int(u.speaker.removeprefix("actor"))))
        sentence.append(str(int(Path(u.audio).stem.split("-")[4])))
    if emodb_dir is not None:
        for u in load_emodb(emodb_dir).utterances:
            utts.append(Utterance(u.uid, u.text, FROM_EMODB[u.label], u.speaker, u.dialogue, u.position, u.audio))
            source.append("emodb")
            speaker.append(u.speaker)
            sentence.append(Path(u.audio).stem[2:5])
    corpus = Corpus("acted", SPEECH_LABELS, utts)
    y = np.array([SPEECH_LABELS.index(u.label) for u in utts])
    y_meld = np.array([MELD_LABELS.index(TO_MELD_LABEL[u.label]) for u in utts])
    return Acted(corpus, np.array(source), np.array(speaker), np.array(sentence), y, y_meld)


def split(data: Acted, name: str, train_actors: Sequence[str] = tuple(actors(1, 16)),
          val_actors: Sequence[str] = tuple(actors(17, 20)), test_actors: Sequence[str] = tuple(actors(21, 24))) -> dict[str, dict[str, list[int]]]:
    """{"train": {...}, "val": {...}, "test": {...}}: each part a dict of named clip lists (their
    union is the part). Test sets are named for what they hold out. The RAVDESS actor groups can be
    changed (tests run on three fake actors)."""
    rav_train01 = data.where("ravdess", train_actors, 1)
    rav_val02 = data.where("ravdess", val_actors, 2)
    emo = sorted(set(data.speaker[data.source == "emodb"]))
    emo_train = [s for s in emo if s not in EMODB_VAL + EMODB_TEST]
    if name == "ship":
        return {"train": {"ravdess": rav_train01, "emodb": data.where("emodb", emo_train)},
                "val": {"ravdess": rav_val02, "emodb": data.where("emodb", EMODB_VAL)},
                "test": {"ravdess-heldout-sentence": data.where("ravdess", test_actors, 2),
                         "ravdess-seen-sentence": data.where("ravdess", test_actors, 1),
                         "emodb-heldout-speakers": data.where("emodb", EMODB_TEST)}}
    if name == "sentence01":
        return {"train": {"ravdess": rav_train01}, "val": {"ravdess": rav_val02},
                "test": {"ravdess-heldout-sentence": data.where("ravdess", test_actors, 2)}}
    if name == "sentence02":
        return {"train": {"ravdess": data.where("ravdess", train_actors, 2)}, "val": {"ravdess": data.where("ravdess", val_actors, 1)},
                "test": {"ravdess-heldout-sentence": data.where("ravdess", test_actors, 1)}}
    if name == "to-emodb":
        return {"train": {"ravdess": rav_train01}, "val": {"ravdess": rav_val02},
                "test": {"emodb-heldout-corpus": data.where("emodb"), "ravdess-heldout-sentence": data.where("ravdess", test_actors, 2)}}
    if name == "to-ravdess":
        surprised = SPEECH_LABELS.index("surprised")
        rav_all = [i for i in data.where("ravdess") if data.y[i] != surprised]
        return {"train": {"emodb": data.where("emodb", [s for s in emo if s not in EMODB_VAL])},
                "val": {"emodb": data.where("emodb", EMODB_VAL)},
                "test": {"ravdess-heldout-corpus": rav_all}}
    raise ValueError(f"unknown split {name!r} (one of {', '.join(SPLITS)})")


def flat(part: dict[str, list[int]]) -> list[int]:
    return sorted({i for v in part.values() for i in v})


def features(data: Acted, cache_dir: str | Path, n_aug: int = 2, seed: int = 0) -> SpeechFeatures:
    """Clean + `n_aug` live-like versions of every clip, one cache per corpus (training.speech_cache);
    babble noise comes from speakers that every split may train on (RAVDESS actors 1-16, EmoDB
    speakers other than 11-13), never from a test speaker of the shipped split."""
    parts = []
    for src in ("ravdess", "emodb"):
        idx = data.where(src)
        if not idx:
            continue
        sub = Corpus(src, SPEECH_LABELS, [data.corpus.utterances[i] for i in idx])
        if src == "ravdess":
            babble = [k for k, i in enumerate(idx) if int(data.speaker[i]) <= 16]
        else:
            babble = [k for k, i in enumerate(idx) if data.speaker[i] not in EMODB_VAL + EMODB_TEST]
        f = build(sub, range(len(idx)), {k: n_aug for k in range(len(idx))}, cache_dir, seed=seed, babble_clips=babble)
        parts.append((np.asarray(idx), f))
    clip = np.concatenate([idx[f.clip] for idx, f in parts])
    return SpeechFeatures(clip, np.concatenate([f.variant for _, f in parts]), [m for _, f in parts for m in f.mels],
                          np.concatenate([f.whisper for _, f in parts]))
