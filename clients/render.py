"""Human-readable rendering of events for terminals: coloured labels, probability bars, modality
weights and a running emotion timeline. Pure functions of the events; no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from clients.client import Event
from streamer import protocol as P

# ANSI 256-colour codes per label (MELD's seven and common acted-speech extras)
COLOURS = {
    "neutral": 250, "joy": 220, "happiness": 220, "surprise": 45, "anger": 196, "sadness": 33,
    "disgust": 106, "fear": 135, "boredom": 244,
}
RESET = "\033[0m"


def paint(text: str, label: str, colour: bool) -> str:
    if not colour:
        return text
    return f"\033[1;38;5;{COLOURS.get(label, 252)}m{text}{RESET}"


def bar(p: float, width: int = 10) -> str:
    full = int(round(max(0.0, min(1.0, p)) * width))
    return "█" * full + "░" * (width - full)


def clock(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    return f"{int(m):02d}:{s:04.1f}"


@dataclass
class Renderer:
    """Turns a stream of events into lines. Keeps each utterance's transcript until its emotion."""

    colour: bool = True
    show_revisions: bool = True
    transcripts: dict[tuple[str, object], str] = field(default_factory=dict)
    spans: dict[tuple[str, object], tuple[float, float]] = field(default_factory=dict)
    timeline: dict[str, list[str]] = field(default_factory=dict)

    def render(self, ev: Event) -> list[str]:
        key = (ev.session_id, ev.utterance_id)
        speaker = f" {ev.get('speaker')}" if ev.get("speaker") else ""
        if ev.type == P.SESSION_STARTED:
            return [f"● session {ev.session_id} started"]
        if ev.type == P.UTTERANCE_ENDED:
            self.spans[key] = (float(ev.get("start_s", 0.0)), float(ev.get("end_s", 0.0)))
            return []
        if ev.type == P.TRANSCRIPT:
            self.transcripts[key] = ev.get("text", "")
            return []
        if ev.type in (P.EMOTION, P.EMOTION_REVISED):
            if ev.type == P.EMOTION_REVISED and not self.show_revisions:
                return []
            label, scores = ev.get("label", "?"), ev.get("scores", {})
            w = ev.get("modality_weights", {})
            start, end = self.spans.get(key, (0.0, 0.0))
            prefix = "  ↻ revised" if ev.type == P.EMOTION_REVISED else f"[{clock(start)}–{clock(end)}]{speaker}"
            line = (
                f"{prefix} {paint(f'{label:<8}', label, self.colour)} {bar(scores.get(label, 0.0))} "
                f"{scores.get(label, 0.0):.2f}  speech {w.get('speech', 0.0):.2f} | text {w.get('text', 0.0):.2f}"
            )
            if ev.type == P.EMOTION:
                self.timeline.setdefault(ev.session_id, []).append(label)
                latency = ev.get("latency_ms")
                if latency is not None:
                    line += f"  ({latency:.0f} ms)"
                text = self.transcripts.get(key, "")
                line += f'  "{text}"' if text else "  (no words)"
            return [line]
        if ev.type == P.ERROR:
            return [f"! error {ev.get('code')}: {ev.get('message')}"]
        if ev.type == P.SESSION_ENDED:
            return [f"● session {ev.session_id} ended", "  timeline " + self.timeline_line(ev.session_id)]
        return []

    def timeline_line(self, session_id: str) -> str:
        labels = self.timeline.get(session_id, [])
        if not labels:
            return "(no utterances)"
        return "".join(paint("■", lab, self.colour) if self.colour else lab[0].upper() for lab in labels)


def jsonl(ev: Event) -> str:
    return json.dumps(ev.data, ensure_ascii=False)
