"""Speakers within one channel: online clustering of a session's utterance voice embeddings.

Synchronous and I/O-free, like the segmenter: feed each utterance's embedding in the order the
utterances ended, get its speaker label ("S1", "S2", ... in order of first appearance) and the
earlier utterances whose label changed now that more of the conversation is known.

How: every add() re-clusters the last `window` utterances agglomeratively and maps the new
clusters onto the old labels so that labels stay stable (Hungarian assignment on how many
utterances each cluster shares with each label). Embeddings are first put in the `VoiceSpace`:
centred on the voice model's mean embedding and scaled to unit length, then whitened against how
one speaker's voice varies (emotion, sentence, recording: WCCN, fitted on training speakers) and
scaled to unit length again. Each utterance has a weight (the service gives its seconds of voice)
and a cluster's size n is the sum of its weights. The merge cost of
clusters a and b is Ward's, sqrt(2 h) * |c_a - c_b| with h = n_a n_b / (n_a + n_b), except that h
is capped at `cap`: a small cluster (a short utterance, whose embedding is noisy; one odd shout)
joins a big one easily, as with Ward, but two big clusters are compared by their centroids alone,
so the threshold does not drift with the length of the conversation as plain Ward's does.
Clusters merge while the cheapest merge costs less than `threshold`, and further until at most
`max_speakers` remain. So a new voice becomes a speaker of its own once it has said enough (a
few seconds): until then its first short utterance sits with the nearest speaker, and is moved
(a revision) when the voice has its own cluster.

A cluster that matches no label takes the label of a voice that has left the window when it is
close enough by the same cost (the same person talking again after a long while), else a new
label. Labels are never reused for another voice: a label whose utterances all moved elsewhere
is retired. Utterances older than the window keep their last label and still make up their
label's centroid.

Cost: one merge loop over at most `window` utterances per add() (numpy, no BLAS: see
gram_matrix), measured 1.3 ms median, 2.1 ms p95 at the default window of 64 on the project's
2-core CPU: small enough for the event loop. The whitening adds 0.07 ms (1.28 -> 1.35 ms median,
measured side by side).

The whitening's shrinkage, `threshold` and `cap` (the service's defaults: streamer.config.DiarizeConfig,
streamer/assets/voice_space.npz) were chosen on RAVDESS actors 1-20 and EmoDB conversations cut by
the service's segmenter (bench/diarization.py --tune: the shrinkage by speaker-disjoint 2-fold
cross-validation), never on the bench's test actors 21-24.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

LABEL_PREFIX = "S"  # labels are S1, S2, ...
DEFAULT_THRESHOLD = 3.0
DEFAULT_CAP = 16.0


@dataclass(frozen=True)
class Revision:
    """An earlier utterance now attributed to another speaker (the `speaker.revised` event)."""

    utterance_id: int
    speaker: str
    previous_speaker: str


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    if not np.isfinite(n).all() or (n == 0).any():
        raise ValueError("a voice embedding must be a finite vector away from the model's mean")
    return v / n


@dataclass(frozen=True, eq=False)
class VoiceSpace:
    """Where voices are compared: an embedding minus `center`, scaled to unit length, times `whiten`
    (when given), scaled to unit length again."""

    center: np.ndarray  # (D,) the voice model's mean embedding over training clips
    # (D, D) within-speaker whitening: the inverse square root of the mean within-speaker covariance
    # of centred unit embeddings, shrunk towards a multiple of the identity; None: centring only
    whiten: np.ndarray | None = None
    shrink: float = 1.0  # the shrinkage it was fitted with (1: no whitening)

    def __post_init__(self) -> None:
        c = np.asarray(self.center, dtype=np.float64).reshape(-1)
        w = None if self.whiten is None else np.asarray(self.whiten, dtype=np.float64)
        if not np.isfinite(c).all() or (w is not None and (w.shape != (c.size, c.size) or not np.isfinite(w).all())):
            raise ValueError(f"a voice space needs a finite centre and a finite {c.size}x{c.size} whitening (or none)")
        object.__setattr__(self, "center", c)
        object.__setattr__(self, "whiten", w)

    def project(self, v: np.ndarray) -> np.ndarray:
        """Embeddings (D,) or (N, D) in this space: unit vectors."""
        v = np.asarray(v, dtype=np.float64)
        if v.shape[-1] != self.center.size:
            raise ValueError(f"embedding of size {v.shape[-1]}, the voice space has {self.center.size}")
        z = _unit(v - self.center)
        # einsum without `optimize` runs numpy's own loop, not BLAS (see gram_matrix): 0.07 ms
        return z if self.whiten is None else _unit(np.einsum("...i,ij->...j", z, self.whiten))

    @classmethod
    def fit(cls, per_speaker: Sequence[np.ndarray], shrink: float) -> VoiceSpace:
        """Centre and whitening from each training speaker's clip embeddings ((n_i, D) each).
        `shrink` in (0, 1]: the weight of the identity in the within-speaker covariance (1: centring only)."""
        if not 0 < shrink <= 1 or len(per_speaker) < 2:
            raise ValueError("need 0 < shrink <= 1 and at least two speakers")
        xs = [np.asarray(x, dtype=np.float64) for x in per_speaker]
        center = np.concatenate(xs).mean(0)
        if shrink == 1:
            return cls(center)
        zs = [_unit(x - center) for x in xs]
        within = sum(np.cov(z.T, bias=True) for z in zs) / len(zs)
        d = within.shape[0]
        within = (1 - shrink) * within + shrink * np.trace(within) / d * np.eye(d)
        evals, evecs = np.linalg.eigh(within)
        return cls(center, (evecs * evals ** -0.5) @ evecs.T, shrink)

    def save(self, path: Path) -> None:
        arrays = {"center": self.center.astype(np.float32), "shrink": np.float64(self.shrink)}
        if self.whiten is not None:
            arrays["whiten"] = self.whiten.astype(np.float32)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path, dim: int | None = None) -> VoiceSpace:
        with np.load(path) as f:
            space = cls(f["center"], f["whiten"] if "whiten" in f.files else None, float(f["shrink"]))
        if dim is not None and space.center.size != dim:
            raise ValueError(f"{path}: a voice space of {space.center.size} dimensions, need {dim}")
        return space


def merge_cost(ca: np.ndarray, na: float, cb: np.ndarray, nb: np.ndarray | float, cap: float) -> np.ndarray:
    """The capped Ward cost of merging cluster (centroid ca, size na) with each of cb (sizes nb)."""
    h = np.minimum(na * np.asarray(nb) / (na + np.asarray(nb)), cap)
    return np.sqrt(2.0 * h) * np.linalg.norm(np.atleast_2d(cb) - ca, axis=-1)


def gram_matrix(x: np.ndarray) -> np.ndarray:
    """Dot products of the rows of x, (n, n), without BLAS: its worker threads spin after a small
    product and slowed the merge loop below 5-fold on a loaded 2-core machine (measured)."""
    x = np.asarray(x, dtype=np.float64)
    return (x[:, None, :] * x[None, :, :]).sum(-1) if len(x) else np.zeros((0, 0))


def cluster(gram: np.ndarray, threshold: float, cap: float = DEFAULT_CAP, max_clusters: int | None = None,
            weights: np.ndarray | None = None) -> np.ndarray:
    """Agglomerative clusters of unit vectors given their Gram matrix (see the module docstring),
    each vector counting `weights` (default 1) in the cluster sizes. Returns a cluster number per
    vector: 0, 1, ... in order of each cluster's first vector."""
    n = len(gram)
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    # centroid dot products, updated in O(n) per merge: c = (na ca + nb cb) / (na + nb) is linear
    gram = np.array(gram, dtype=np.float64)  # a copy: updated in place
    size = np.ones(n) if weights is None else np.array(weights, dtype=np.float64)
    if size.shape != (n,) or not (size > 0).all():
        raise ValueError("one positive weight per vector")
    alive = np.ones(n, dtype=bool)
    owner = np.arange(n)  # row -> the cluster that holds it (clusters are named by a row index)
    diag = np.diag(gram).copy()
    h0 = np.minimum(size[:, None] * size[None, :] / (size[:, None] + size[None, :]), cap)
    cost = np.sqrt(2.0 * h0 * np.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0))
    np.fill_diagonal(cost, np.inf)
    live = n
    while live > 1:
        i, j = divmod(int(np.argmin(cost)), n)
        if cost[i, j] >= threshold and (max_clusters is None or live <= max_clusters):
            break
        na, nb = size[i], size[j]
        row = (na * gram[i] + nb * gram[j]) / (na + nb)  # new centroid . every centroid
        gii = (na * na * gram[i, i] + 2 * na * nb * gram[i, j] + nb * nb * gram[j, j]) / (na + nb) ** 2
        gram[i], gram[:, i] = row, row
        gram[i, i] = diag[i] = gii
        size[i] = na + nb
        alive[j] = False
        owner[owner == j] = i
        live -= 1
        h = np.minimum(size[i] * size / (size[i] + size), cap)
        c = np.sqrt(2.0 * h * np.maximum(gii + diag - 2.0 * row, 0.0))
        c[~alive] = np.inf
        c[i] = np.inf
        cost[i], cost[:, i] = c, c
        cost[j], cost[:, j] = np.inf, np.inf
    order: dict[int, int] = {}
    for o in owner:  # renumber by first appearance
        order.setdefault(int(o), len(order))
    return np.array([order[int(o)] for o in owner], dtype=np.int64)


class SpeakerClusters:
    """One session's speakers. add() an utterance's voice embedding, get (label, revisions)."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, max_speakers: int | None = None, window: int = 64,
                 cap: float = DEFAULT_CAP, space: VoiceSpace | None = None) -> None:
        if threshold <= 0 or cap <= 0:
            raise ValueError(f"threshold and cap must be > 0, got {threshold}, {cap}")
        if max_speakers is not None and max_speakers < 1:
            raise ValueError(f"max_speakers must be >= 1, got {max_speakers}")
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.threshold, self.cap, self.max_speakers, self.window = threshold, cap, max_speakers, window
        self.space = space  # None: raw embeddings, scaled to unit length
        self._ids: list[int] = []  # utterance ids in the window, in the order they were added
        self._vecs: list[np.ndarray] = []  # their embeddings in the voice space (unit vectors)
        self._weights: list[float] = []  # their weights (seconds of voice, as the runner gives them)
        self._gram = np.zeros((0, 0))  # their dot products (kept up to date: O(window) per add)
        self.labels: dict[int, str] = {}  # every utterance's current label (frozen ones included)
        self._frozen: dict[str, tuple[np.ndarray, float]] = {}  # label -> weighted sum, total weight of its frozen utterances
        self._next = 1  # number of the next new label

    @property
    def speakers(self) -> list[str]:
        """Labels that some utterance carries now, in order of first appearance."""
        return sorted(set(self.labels.values()), key=lambda s: int(s[len(LABEL_PREFIX):]))

    def add(self, utterance_id: int, embedding: np.ndarray, weight: float = 1.0) -> tuple[str, list[Revision]]:
        """The newest utterance's label, and every earlier utterance whose label changed. `weight`:
        how much the utterance counts (the service gives seconds of voice: a short utterance's
        embedding is noisy, so it joins a speaker easily and rarely makes one on its own)."""
        if utterance_id in self.labels:
            raise ValueError(f"utterance {utterance_id} was added already")
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        v = np.asarray(embedding, dtype=np.float64).reshape(-1)
        v = _unit(v) if self.space is None else self.space.project(v)
        dots = np.array([float((u * v).sum()) for u in self._vecs] + [float((v * v).sum())])
        n = len(self._vecs)
        gram = np.empty((n + 1, n + 1))
        gram[:n, :n], gram[n, :], gram[:, n] = self._gram, dots, dots
        self._ids.append(utterance_id)
        self._vecs.append(v)
        self._weights.append(float(weight))
        if len(self._ids) > self.window:  # the oldest leaves the window with its label
            old, vec, w = self._ids.pop(0), self._vecs.pop(0), self._weights.pop(0)
            gram = gram[1:, 1:]
            label = self.labels[old]
            total, count = self._frozen.get(label, (np.zeros_like(vec), 0.0))
            self._frozen[label] = (total + w * vec, count + w)
        self._gram = gram
        vecs, weights = np.stack(self._vecs), np.array(self._weights)
        clusters = cluster(gram, self.threshold, self.cap, self.max_speakers, weights)
        mapping = self._map(clusters, vecs, weights)
        revisions = []
        for uid, c in zip(self._ids, clusters):
            new, old = mapping[int(c)], self.labels.get(uid)
            if old is not None and new != old:
                revisions.append(Revision(uid, new, old))
            self.labels[uid] = new
        return self.labels[utterance_id], revisions

    def _map(self, clusters: np.ndarray, vecs: np.ndarray, weights: np.ndarray) -> dict[int, str]:
        """Cluster number -> label: the old label it shares the most utterances with (one cluster
        per label), else a label held only by frozen utterances that is close enough, else new."""

        k = int(clusters.max()) + 1
        old = [self.labels.get(uid) for uid in self._ids]
        names = sorted({o for o in old if o is not None})
        mapping: dict[int, str] = {}
        if names:
            overlap = np.zeros((k, len(names)))
            first: dict[str, int] = {}
            for c, o in zip(clusters, old):
                if o is not None:
                    overlap[c, names.index(o)] += 1
                    first.setdefault(o, int(c))
            for o, c in first.items():  # a tie goes to the cluster holding the label's earliest utterance
                overlap[c, names.index(o)] += 0.5
            rows, cols = linear_sum_assignment(-overlap)
            mapping = {int(r): names[c] for r, c in zip(rows, cols) if overlap[r, c] > 0}
        frozen_only = [lab for lab in self._frozen if lab not in mapping.values()]
        in_use = set(mapping.values()) | set(self._frozen)
        for c in range(k):  # clusters are numbered by first appearance: new labels keep that order
            if c in mapping:
                continue
            mine = clusters == c
            w = float(weights[mine].sum())
            centroid = (weights[mine, None] * vecs[mine]).sum(0) / w
            costs = {lab: float(merge_cost(centroid, w, self._frozen[lab][0] / self._frozen[lab][1],
                                           self._frozen[lab][1], self.cap)[0]) for lab in frozen_only}
            best = min(costs, key=costs.__getitem__) if costs else None
            full = self.max_speakers is not None and len(in_use) >= self.max_speakers
            if best is not None and (costs[best] < self.threshold or full):
                label = best
                frozen_only.remove(best)
            else:
                label = f"{LABEL_PREFIX}{self._next}"
                self._next += 1
            mapping[c] = label
            in_use.add(label)
        return mapping
