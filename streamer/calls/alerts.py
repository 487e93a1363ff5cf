"""Alert rules over emotion events, e.g. "customer anger or disgust >= 0.6 in 2 of the last 3
customer utterances". Rules come from a JSON file; evaluation is plain and synchronous.

    {"rules": [{"name": "angry-customer", "speaker": "customer", "labels": ["anger", "disgust"],
                "threshold": 0.6, "count": 2, "window": 3, "severity": "high"}]}

A rule fires when its condition becomes true and re-arms once it is false again, so a customer
who stays angry raises one alert, not one per utterance.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer import protocol as P


@dataclass(frozen=True)
class AlertRule:
    name: str
    labels: tuple[str, ...]
    threshold: float = 0.6
    count: int = 2  # utterances that must match ...
    window: int = 3  # ... among the speaker's last `window`
    speaker: str | None = None  # None: any speaker
    aggregate: str = "max"  # an utterance matches when max (or sum) of the labels' scores >= threshold
    severity: str = "warning"
    confident_only: bool = False  # True: an emotion marked confidence "low" (e.g. an unfamiliar voice) never matches

    def __post_init__(self) -> None:
        if not self.name or not self.labels:
            raise ValueError("an alert rule needs a name and at least one label")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"rule {self.name}: threshold must be in (0, 1]")
        if not 1 <= self.count <= self.window:
            raise ValueError(f"rule {self.name}: need 1 <= count <= window")
        if self.aggregate not in ("max", "sum"):
            raise ValueError(f"rule {self.name}: aggregate must be max or sum")
        if not isinstance(self.confident_only, bool):
            raise ValueError(f"rule {self.name}: confident_only must be true or false")

    def matches(self, scores: dict[str, float]) -> tuple[bool, float]:
        vals = [float(scores.get(lab, 0.0)) for lab in self.labels]
        value = sum(vals) if self.aggregate == "sum" else max(vals)
        return value >= self.threshold, value

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AlertRule":
        known = {"name", "labels", "threshold", "count", "window", "speaker", "aggregate", "severity", "confident_only"}
        if set(d) - known:
            raise ValueError(f"unknown alert rule fields: {sorted(set(d) - known)}")
        d = dict(d)
        labels = d.get("labels")
        d["labels"] = tuple([labels] if isinstance(labels, str) else labels or ())
        return cls(**d)


def load_rules(path: str | Path) -> list[AlertRule]:
    """Rules from a JSON file ({"rules": [...]} or a bare list); errors name the problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read alert rules {path}: {e}") from e
    rules = data.get("rules") if isinstance(data, dict) else data
    if not isinstance(rules, list):
        raise ValueError(f"{path}: expected a list of rules under 'rules'")
    return [AlertRule.from_dict(r) for r in rules]


@dataclass
class _RuleState:
    recent: deque[tuple[bool, float, Any]]
    active: bool = False


@dataclass
class AlertEngine:
    """Per-session rule state. `evaluate` takes one emotion event and returns the alerts it raises
    (dicts of alert fields; the caller numbers and publishes them)."""

    rules: list[AlertRule]
    _state: dict[tuple[str, str, str], _RuleState] = field(default_factory=dict)

    def evaluate(self, ev: dict[str, Any]) -> list[dict[str, Any]]:
        speaker = ev.get("speaker")
        out = []
        for rule in self.rules:
            if rule.speaker is not None and rule.speaker != speaker:
                continue
            key = (ev.get("session_id", ""), rule.name, speaker or "")
            st = self._state.get(key)
            if st is None:
                st = self._state[key] = _RuleState(deque(maxlen=rule.window))
            hit, value = rule.matches(ev.get("scores", {}))
            if rule.confident_only and ev.get("confidence") == P.LOW_CONFIDENCE:
                hit = False
            st.recent.append((hit, value, ev.get("utterance_id")))
            firing = sum(h for h, _, _ in st.recent) >= rule.count
            if firing and not st.active:
                out.append({
                    "rule": rule.name, "severity": rule.severity, "speaker": speaker,
                    "labels": list(rule.labels), "threshold": rule.threshold,
                    "utterance_id": ev.get("utterance_id"),
                    "matched_utterances": [u for h, _, u in st.recent if h],
                    "value": round(value, 4),
                    "message": (f"{speaker or 'speaker'}: {' or '.join(rule.labels)} >= {rule.threshold:g} "
                                f"in {sum(h for h, _, _ in st.recent)} of the last {len(st.recent)} utterances"),
                })
            st.active = firing
        return out

    def forget(self, session_id: str) -> None:
        for key in [k for k in self._state if k[0] == session_id]:
            del self._state[key]
