"""The pure parts of bench/stream_bench.py: which variants diarize and how they differ from the
service's defaults (the bench itself streams for minutes)."""

from __future__ import annotations

from dataclasses import replace

from bench.stream_bench import diarized, variants


def test_diarize_variants_differ_from_the_service_only_where_named() -> None:
    v = variants(None)
    assert {name for name in v if diarized(name)} == {"diarize", "diarize_nice19"}
    assert v["diarize"] == v["emostream"]  # the sessions ask for diarize; the service is the same
    assert v["diarize_nice19"].diarize.voice_nice == 19 != v["emostream"].diarize.voice_nice
    assert replace(v["diarize_nice19"], diarize=v["emostream"].diarize) == v["emostream"]


def test_nosplit_is_the_service_without_pause_splits() -> None:
    from bench.stream_bench import VARIANTS

    v = variants(None)
    assert set(v) == set(VARIANTS)
    assert v["nosplit"].segmenter.split_after_s == 0.0 < v["emostream"].segmenter.split_after_s
    assert replace(v["nosplit"], segmenter=v["emostream"].segmenter) == v["emostream"]
