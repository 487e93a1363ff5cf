"""bench/asr_margin.py: the windows its margins give, and composites that land in their bands with
the right reference (one validation actor of ../shared/data/ravdess, two composites per band)."""

from __future__ import annotations

import numpy as np

from bench.asr_margin import BANDS, SR, composites
from bench.asr_window import SENTENCES
from model.features import whisper_window_frames
from tests.stream_util import words


def test_the_margin_decides_the_window_of_a_long_utterance() -> None:
    # 8.5 s: 15 s with the service's 2 s margin, 10 s with 1 s; 13.5 s: 20 vs 15
    assert [whisper_window_frames(int(8.5 * SR), 10.0, m, 5.0) for m in (2.0, 1.0)] == [1500, 1000]
    assert [whisper_window_frames(int(13.5 * SR), 10.0, m, 5.0) for m in (2.0, 1.0)] == [2000, 1500]


def test_composites_land_in_their_bands_with_the_sentences_in_order() -> None:
    sets = composites(np.random.default_rng(0), actors=range(17, 18), per_actor=2)
    assert set(sets) == set(BANDS)
    for band, items in sets.items():
        lo, hi = BANDS[band]
        assert len(items) == 2
        for audio, ref in items:
            assert lo * SR <= len(audio) <= hi * SR
            n = len(words(ref)) // 6
            assert n >= 2 and words(ref) == [w for s in _sentences(ref, n) for w in words(s)]


def _sentences(ref: str, n: int) -> list[str]:
    """The reference split back into its n six-word sentences, each one of the two RAVDESS sentences."""
    ws = words(ref)
    out = [" ".join(ws[6 * i : 6 * i + 6]) for i in range(n)]
    assert all(s in SENTENCES.values() for s in out) and len(ws) == 6 * n
    return out
