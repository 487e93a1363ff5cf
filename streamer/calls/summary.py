"""Call summary: what a supervisor reads when a call ends. Built from the call's events alone."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from streamer import protocol as P


def sentiment_trend(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A speaker's sentiment over the call: the distribution, the mean score in [-1, 1], the means
    of the first and last thirds of their utterances, and `trend` = last - first (> 0: the call
    went better for them). None when no utterance carried a sentiment."""
    scores = [e["sentiment_score"] for e in entries if "sentiment_score" in e]
    if not scores:
        return None
    third = max(1, len(scores) // 3)
    first, last = sum(scores[:third]) / third, sum(scores[-third:]) / third
    counts = Counter(e["sentiment"] for e in entries if "sentiment" in e)
    return {"distribution": {k: round(c / len(scores), 4) for k, c in counts.most_common()},
            "mean": round(sum(scores) / len(scores), 4), "start": round(first, 4), "end": round(last, 4),
            "trend": round(last - first, 4)}


@dataclass
class CallSummary:
    session_id: str
    timeline: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    alerts: list[dict[str, Any]] = field(default_factory=list)
    _spans: dict[Any, tuple[float, float]] = field(default_factory=dict)
    _texts: dict[Any, str] = field(default_factory=dict)

    def add(self, ev: dict[str, Any]) -> None:
        """Feed every event of the call, in order."""
        t, uid = ev.get("type"), ev.get("utterance_id")
        if t == P.UTTERANCE_ENDED:
            self._spans[uid] = (ev.get("start_s", 0.0), ev.get("end_s", 0.0))
        elif t == P.TRANSCRIPT:
            self._texts[uid] = ev.get("text", "")
        elif t in (P.EMOTION, P.EMOTION_REVISED):
            speaker = ev.get("speaker") or "speaker"
            entries = self.timeline[speaker]
            entry = {
                "utterance_id": uid, "label": ev["label"], "score": round(ev["scores"][ev["label"]], 4),
                "scores": ev["scores"], "start_s": self._spans.get(uid, (None, None))[0],
                "end_s": self._spans.get(uid, (None, None))[1], "text": self._texts.get(uid, ""),
            }
            if ev.get("sentiment") is not None:
                entry |= {"sentiment": ev["sentiment"], "sentiment_score": ev.get("sentiment_score", 0.0)}
            entry |= {k: ev[k] for k in ("confidence", "familiar_voice") if ev.get(k) is not None}
            for i, old in enumerate(entries):
                if old["utterance_id"] == uid:  # a revision replaces the live prediction
                    entries[i] = {**entry, "revised": True}
                    break
            else:
                if t == P.EMOTION:
                    entries.append(entry)
        elif t == P.SPEAKER_REVISED:  # diarized: the utterance moves to its new speaker's timeline
            self._move(uid, ev.get("previous_speaker") or "speaker", ev.get("speaker") or "speaker")
        elif t == "alert":
            self.alerts.append({k: v for k, v in ev.items() if k not in ("type", "session_id")})

    def _move(self, uid: Any, old: str, new: str) -> None:
        entries = self.timeline.get(old, [])
        moved = [e for e in entries if e["utterance_id"] == uid]
        if not moved or old == new:
            return
        entries[:] = [e for e in entries if e["utterance_id"] != uid]
        if not entries:
            del self.timeline[old]  # a speaker left with no utterance is not in the summary
        target = self.timeline[new]
        target.extend(moved)
        target.sort(key=lambda e: e["utterance_id"])

    def to_dict(self) -> dict[str, Any]:
        speakers = {}
        for speaker, entries in self.timeline.items():
            counts = Counter(e["label"] for e in entries)
            n = max(1, len(entries))
            peaks: dict[str, dict[str, Any]] = {}
            for e in entries:
                for label, p in e["scores"].items():
                    if label != "neutral" and (label not in peaks or p > peaks[label]["score"]):
                        peaks[label] = {"score": round(p, 4), "utterance_id": e["utterance_id"], "start_s": e["start_s"]}
            speakers[speaker] = {
                "utterances": len(entries),
                "distribution": {lab: round(c / n, 4) for lab, c in counts.most_common()},
                "dominant": counts.most_common(1)[0][0] if counts else None,
                "peaks": dict(sorted(peaks.items(), key=lambda kv: -kv[1]["score"])[:3]),
                "timeline": [{k: e[k] for k in ("utterance_id", "start_s", "end_s", "label", "score", "text", "sentiment", "sentiment_score",
                                                "confidence", "familiar_voice") if k in e} for e in entries],
            }
            # how far to trust the distribution: the share of its emotions marked low confidence, and of
            # voices unlike the speech the model learned from (each only when the events said)
            for key, field_, bad in (("low_confidence_share", "confidence", P.LOW_CONFIDENCE), ("unfamiliar_voice_share", "familiar_voice", False)):
                known = [e[field_] for e in entries if field_ in e]
                if known:
                    speakers[speaker][key] = round(sum(v == bad for v in known) / len(known), 4)
            trend = sentiment_trend(entries)
            if trend is not None:
                speakers[speaker]["sentiment"] = trend
        return {"session_id": self.session_id, "speakers": speakers, "alerts": self.alerts}
