"""Regression guard for the bundled checkpoint on live English speech: acted RAVDESS clips of two
held-out actors saying the sentence the bundled model never trained on (tests/fixtures/ravdess, see
SOURCE.txt), each actor's angry, sad and neutral clip in
one session between silences, through the real service (VAD -> Whisper tiny.en -> model).

It asserts what a useful emotion model must do here, not a score: every clip is one utterance with
one `emotion`; an actor's angry and sad clips get different labels (the words are identical, "Dogs
are sitting by the door", so only the voice can tell them apart); and the model leans on speech
(modality weight speech > text) for every angry and sad clip, and for a neutral clip unless it is
called neutral (then words and voice agree, and either may weigh more); and every clip's voice is
`familiar_voice` (acted speech of the kind the model learned from is not flagged as unfamiliar).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.live_accuracy import build_stream, match_clips, parse_clip
from streamer import protocol as P
from streamer.client import stream_audio
from tests.stream_util import WAIT_S, check_session_events, served, whisper  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

RAVDESS = Path(__file__).resolve().parent / "fixtures" / "ravdess"
ACTORS = (21, 22)
EMOTIONS = ("05", "04", "01")  # angry, sad, neutral: the clip order in each actor's session


@pytest.fixture(scope="module")
def bundled_model():  # type: ignore[no-untyped-def]
    from model import DEFAULT_CHECKPOINT, load_checkpoint

    return load_checkpoint(DEFAULT_CHECKPOINT, device="cpu")


def _clips(actor: int) -> list[Path]:
    out = []
    for emo in EMOTIONS:
        (path,) = RAVDESS.glob(f"03-01-{emo}-*-{actor}.flac")
        out.append(path)
    return out


def test_acted_anger_sadness_and_neutral_are_told_apart_by_voice(bundled_model, whisper) -> None:  # noqa: F811
    from model.features import load_audio

    sessions: dict[int, tuple[list[Path], np.ndarray, list[tuple[float, float]]]] = {}
    for actor in ACTORS:
        paths = _clips(actor)
        audio, spans = build_stream([load_audio(str(p), sr=16_000) for p in paths], gap_s=1.2, noise_db=-60,
                                    rng=np.random.default_rng(actor))
        sessions[actor] = (paths, audio, spans)

    async def scenario() -> dict[int, list[dict[str, Any]]]:
        out = {}
        async with served(bundled_model, whisper) as app:
            for actor, (_, audio, _) in sessions.items():
                res = await stream_audio(app.url, audio, realtime=False, session_id=f"guard-{actor}", timeout_s=WAIT_S * 4)
                out[actor] = res.events
        return out

    events = asyncio.run(scenario())
    rows, problems = [], []
    for actor, (paths, _, spans) in sessions.items():
        evs = events[actor]
        check_session_events(evs)
        ended = [(e["utterance_id"], e["start_s"], e["end_s"]) for e in evs if e["type"] == P.UTTERANCE_ENDED]
        emotions: dict[int, list[dict[str, Any]]] = {}
        for e in evs:
            if e["type"] == P.EMOTION:
                emotions.setdefault(e["utterance_id"], []).append(e)
        text = {e["utterance_id"]: e["text"] for e in evs if e["type"] == P.TRANSCRIPT}
        m = match_clips(spans, ended)
        labels = {}
        for path, uids in zip(paths, m.per_clip):
            clip = parse_clip(path)
            got = [ev for u in uids for ev in emotions.get(u, [])]
            if len(uids) != 1 or len(got) != 1:  # (a)
                problems.append(f"{path.name} ({clip.emotion}): {len(uids)} utterances, {len(got)} emotion events")
                continue
            ev = got[0]
            labels[clip.emotion] = ev["label"]
            w = ev["modality_weights"]
            rows.append(f"{path.name} {clip.emotion:8s} -> {ev['label']:8s} speech {w['speech']:.2f} text {w['text']:.2f} "
                        f"{text.get(uids[0])!r}")
            # (c) where the voice carries the emotion, the model must lean on it; a neutral clip whose
            # neutral words and voice agree ("neutral") may weigh either
            if not w["speech"] > w["text"] and not (clip.emotion == "neutral" and ev["label"] == "neutral"):
                problems.append(f"{path.name} ({clip.emotion}): modality weights speech {w['speech']:.3f} <= text {w['text']:.3f}")
            # (d) acted speech of the kind the model learned from (other actors, another sentence) is a familiar voice
            if ev.get("familiar_voice") is not True:
                problems.append(f"{path.name} ({clip.emotion}): familiar_voice {ev.get('familiar_voice')!r}")
        if m.stray:
            problems.append(f"actor {actor}: {len(m.stray)} utterances outside the clips")
        if "angry" in labels and labels.get("angry") == labels.get("sad"):  # (b)
            problems.append(f"actor {actor}: angry and sad clips both labelled {labels['angry']!r}")
    assert not problems, "\n".join(["emotion guard failed:", *problems, "per clip:", *rows])
