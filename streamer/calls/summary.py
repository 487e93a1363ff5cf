"""Call summary: what a supervisor reads when a call ends. Built from the call's events alone."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from streamer import protocol as P


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
            for i, old in enumerate(entries):
                if old["utterance_id"] == uid:  # a revision replaces the live prediction
                    entries[i] = {**entry, "revised": True}
                    break
            else:
                if t == P.EMOTION:
                    entries.append(entry)
        elif t == "alert":
            self.alerts.append({k: v for k, v in ev.items() if k not in ("type", "session_id")})

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
                "timeline": [{k: e[k] for k in ("utterance_id", "start_s", "end_s", "label", "score", "text")} for e in entries],
            }
        return {"session_id": self.session_id, "speakers": speakers, "alerts": self.alerts}
