"""Human-readable rendering of events for terminals: coloured labels, probability bars, modality
weights, word timings, interim results and a running emotion timeline. Pure functions of the
events; no I/O."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from typing import Any

from clients.client import Event
from streamer import protocol as P

# ANSI 256-colour codes per label (MELD's seven and common acted-speech extras)
COLOURS = {
    "neutral": 250, "joy": 220, "happiness": 220, "surprise": 45, "anger": 196, "sadness": 33,
    "disgust": 106, "fear": 135, "boredom": 244,
}
RESET = "\033[0m"
DIM, DIM_ITALIC = "\033[2m", "\033[2;3m"


def paint(text: str, label: str, colour: bool) -> str:
    if not colour:
        return text
    return f"\033[1;38;5;{COLOURS.get(label, 252)}m{text}{RESET}"


def style(text: str, code: str, colour: bool) -> str:
    return f"{code}{text}{RESET}" if colour and text else text


def word_timings(words: list[dict[str, Any]], width: int | None = None, indent: str = "    ") -> list[str]:
    """`0.00–0.76 And · 0.76–1.02 so · …` (seconds of the session's stream), wrapped at `width`."""
    nb = "\u00a0"  # a word stays with its times when wrapped
    items = [f"{w.get('start_s', 0.0):.2f}–{w.get('end_s', 0.0):.2f}{nb}{str(w.get('word', '')).strip()}" for w in words]
    text = f"{nb}· ".join(items)  # a line may end with a separator, never start with one
    if not width or width <= len(indent) + 20:
        return [indent + text.replace(nb, " ")]
    return [line.replace(nb, " ") for line in textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent,
                                                            break_long_words=False, break_on_hyphens=False)]


def bar(p: float, width: int = 10) -> str:
    full = int(round(max(0.0, min(1.0, p)) * width))
    return "█" * full + "░" * (width - full)


def clock(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    return f"{int(m):02d}:{s:04.1f}"


@dataclass
class Renderer:
    """Turns a stream of events into lines. Keeps each utterance's transcript (and word timings)
    until its emotion, and each open utterance's interim results until its final transcript.

    A partial (transcript.partial / emotion.partial) renders as one line marked `… interim`, with
    the text so far and, from emotion.partial, a provisional label (`joy?`). A terminal that can
    rewrite a line shows `interim_line()` in place instead and replaces it by the final lines. An
    emotion the server marked `"confidence": "low"` gets `(low confidence)` after its score
    (`(low confidence: unfamiliar voice)` when `"familiar_voice": false` is why). An
    utterance's `speaker` (named channels, or a diarized session's S1, S2, ...) follows its times,
    revisions included, and a `speaker.revised` is a `↻ speaker` line."""

    colour: bool = True
    show_revisions: bool = True
    width: int | None = None  # wrap word-timing lines at this many columns (None: one line)
    transcripts: dict[tuple[str, object], str] = field(default_factory=dict)
    words: dict[tuple[str, object], list[dict[str, Any]]] = field(default_factory=dict)
    spans: dict[tuple[str, object], tuple[float, float]] = field(default_factory=dict)
    timeline: dict[str, list[str]] = field(default_factory=dict)
    partials: dict[tuple[str, object], dict[str, Any]] = field(default_factory=dict)  # open utterances, oldest first
    finished: set[tuple[str, object]] = field(default_factory=set)  # utterances whose final transcript came

    def render(self, ev: Event) -> list[str]:
        key = (ev.session_id, ev.utterance_id)
        speaker = f" {ev.get('speaker')}" if ev.get("speaker") else ""
        if ev.type in P.INTERIM_TYPES:
            if key in self.finished:
                return []  # superseded already (the server never sends one this late)
            p = self.partials.setdefault(key, {"text": "", "label": None, "score": 0.0})
            p.update(speaker=ev.get("speaker"), audio_s=float(ev.get("audio_s", 0.0)))
            if ev.get("text"):
                p["text"] = ev.get("text")
            if ev.type == P.EMOTION_PARTIAL:
                p["label"] = ev.get("label", "?")
                p["score"] = float(ev.get("scores", {}).get(p["label"], 0.0))
            return ["  " + self._partial(p)]
        if ev.type == P.SESSION_STARTED:
            return [f"● session {ev.session_id} started"]
        if ev.type == P.UTTERANCE_ENDED:
            self.spans[key] = (float(ev.get("start_s", 0.0)), float(ev.get("end_s", 0.0)))
            return []
        if ev.type == P.TRANSCRIPT:
            self.transcripts[key] = ev.get("text", "")
            self.partials.pop(key, None)
            self.finished.add(key)
            if ev.get("words"):
                self.words[key] = ev.get("words")
            return []
        if ev.type in (P.EMOTION, P.EMOTION_REVISED):
            if ev.type == P.EMOTION_REVISED and not self.show_revisions:
                return []
            label, scores = ev.get("label", "?"), ev.get("scores", {})
            w = ev.get("modality_weights", {})
            start, end = self.spans.get(key, (0.0, 0.0))
            prefix = f"  ↻ revised{speaker}" if ev.type == P.EMOTION_REVISED else f"[{clock(start)}–{clock(end)}]{speaker}"
            note = P.confidence_note(ev)
            unsure = style(note, DIM, self.colour) if note else ""
            line = (
                f"{prefix} {paint(f'{label:<8}', label, self.colour)} {bar(scores.get(label, 0.0))} "
                f"{scores.get(label, 0.0):.2f}{unsure}  speech {w.get('speech', 0.0):.2f} | text {w.get('text', 0.0):.2f}"
            )
            if ev.get("sentiment"):  # absent from servers whose model has no sentiment head
                line += f"  {ev['sentiment']} {ev.get('sentiment_score', 0.0):+.2f}"
            if ev.type == P.EMOTION:
                self.timeline.setdefault(ev.session_id, []).append(label)
                latency = ev.get("latency_ms")
                if latency is not None:
                    line += f"  ({latency:.0f} ms)"
                text = self.transcripts.get(key, "")
                line += f'  "{text}"' if text else "  (no words)"
                words = self.words.pop(key, None)
                if words:
                    return [line, *(style(w, DIM, self.colour) for w in word_timings(words, self.width))]
            return [line]
        if ev.type == P.SPEAKER_REVISED:  # diarized: an earlier utterance was someone else after all
            start, end = self.spans.get(key, (0.0, 0.0))
            return [f"  ↻ speaker [{clock(start)}–{clock(end)}] {ev.get('previous_speaker')} → {ev.get('speaker')}"]
        if ev.type == P.ERROR:
            return [f"! error {ev.get('code')}: {ev.get('message')}"]
        if ev.type == P.SESSION_ENDED:
            for k in [k for k in self.partials if k[0] == ev.session_id]:
                del self.partials[k]  # none are left open by the server; a dropped one must not linger
            self.finished = {k for k in self.finished if k[0] != ev.session_id}
            return [f"● session {ev.session_id} ended", "  timeline " + self.timeline_line(ev.session_id)]
        return []

    def _partial(self, p: dict[str, Any], limit: int | None = None) -> str:
        """One open utterance's interim state: `… interim agent 2.3 s  joy? 0.61  "text so far"`, at
        most `limit` visible characters (the start of the text gives way first)."""
        head = f"… interim{' ' + p['speaker'] if p.get('speaker') else ''} {p.get('audio_s', 0.0):.1f} s"
        label = f"{p['label']}?" if p.get("label") else ""
        score = f" {p['score']:.2f}" if label else ""
        text = p.get("text", "")
        fixed = len(head) + (2 + len(label) + len(score) if label else 0)
        quoted = f'  "{text}"' if text else ""
        if limit is not None and fixed + len(quoted) > limit:
            room = limit - fixed - 5  # the quotes, the two spaces and an ellipsis
            if room < 4:
                return (head + (f"  {label}{score}" if label else ""))[:limit]
            quoted = f'  "…{text[-room:]}"'
        return (style(head, DIM_ITALIC, self.colour)
                + (f"  {paint(label, p['label'], self.colour)}{style(score, DIM_ITALIC, self.colour)}" if label else "")
                + style(quoted, DIM_ITALIC, self.colour))

    def interim_line(self, width: int | None = None) -> str:
        """Every open utterance's interim state on one line of at most `width` visible characters
        (a terminal's in-place status line); "" when nothing is open."""
        if not self.partials:
            return ""
        sep = " | "
        parts = list(self.partials.values())
        limit = None if width is None else max(8, (width - len(sep) * (len(parts) - 1)) // len(parts))
        return sep.join(self._partial(p, limit) for p in parts)

    def timeline_line(self, session_id: str) -> str:
        labels = self.timeline.get(session_id, [])
        if not labels:
            return "(no utterances)"
        return "".join(paint("■", lab, self.colour) if self.colour else lab[0].upper() for lab in labels)


def jsonl(ev: Event) -> str:
    return json.dumps(ev.data, ensure_ascii=False)
