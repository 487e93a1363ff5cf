"""Attention fusion, equations (1)-(3) of Makhmudov et al. (2024).

    F = [Fs, Ft] in R^{n x 2}      each modality projected by an FC to n
    L = tanh(P F)                  P in R^{n x n}                        (1)
    v = softmax(w^T L) in R^2      the per-utterance modality weights    (2)
    M = F v^T in R^n               the fused representation              (3)

A missing modality is masked out of the softmax (its score set to -inf), so its weight is exactly 0.
"""

from __future__ import annotations

import torch
from torch import nn


class AttentionFusion(nn.Module):
    def __init__(self, speech_dim: int, text_dim: int, n: int = 250) -> None:
        super().__init__()
        self.proj_speech = nn.Linear(speech_dim, n)
        self.proj_text = nn.Linear(text_dim, n)
        self.P = nn.Parameter(torch.empty(n, n))
        self.w = nn.Parameter(torch.empty(n))
        nn.init.xavier_uniform_(self.P)
        nn.init.normal_(self.w, std=n**-0.5)

    def forward(self, speech: torch.Tensor, text: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """speech (B, Ds), text (B, Dt), present (B, 2) bool [speech, text] -> M (B, n), v (B, 2)."""
        if not bool(present.any(dim=1).all()):
            raise ValueError("every utterance needs at least one modality (speech or text)")
        F = torch.stack([self.proj_speech(speech), self.proj_text(text)], dim=-1)  # (B, n, 2)
        L = torch.tanh(torch.einsum("kn,bnm->bkm", self.P, F))  # (B, n, 2)     eq. (1)
        scores = torch.einsum("n,bnm->bm", self.w, L)  # (B, 2)
        scores = scores.masked_fill(~present, float("-inf"))
        v = torch.softmax(scores, dim=-1)  # (B, 2)                             eq. (2)
        M = torch.einsum("bnm,bm->bn", F, v)  # (B, n)                          eq. (3)
        return M, v
