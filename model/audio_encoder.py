"""Speech branch: the paper's CNN over a log-mel spectrogram."""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    """3x3 stride-1 conv -> BatchNorm -> ReLU (-> optional 2x2 max-pool)."""

    def __init__(self, c_in: int, c_out: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.bn(self.conv(x))))


class SpeechCNN(nn.Module):
    """Parallel (10,2) and (2,8) convs (8 ch each, 'same' padded, concatenated to 16) -> four 3x3
    convs 16->32->48->64->80 with BatchNorm + ReLU, max-pool 2 after the first two -> FC.

    Input (B, 1, n_mels, T) with valid lengths (B,); output (B, out_dim). Variable length: adaptive
    average pooling over frequency to `freq_bins`, then a mean over the valid time frames only.
    """

    def __init__(self, n_mels: int, out_dim: int, freq_bins: int = 4, dropout: float = 0.3) -> None:
        super().__init__()
        # 'same' padding for even kernels, spelled out: (left, right, top, bottom) over (freq, time)
        self.pad_time = nn.ZeroPad2d((0, 1, 4, 5))
        self.conv_time = nn.Conv2d(1, 8, kernel_size=(10, 2))
        self.pad_freq = nn.ZeroPad2d((3, 4, 0, 1))
        self.conv_freq = nn.Conv2d(1, 8, kernel_size=(2, 8))
        self.bn_in = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(
            ConvBlock(16, 32, pool=True),
            ConvBlock(32, 48, pool=True),
            ConvBlock(48, 64, pool=False),
            ConvBlock(64, 80, pool=False),
        )
        self.freq_pool = nn.AdaptiveAvgPool2d((freq_bins, None))
        self.fc = nn.Linear(80 * freq_bins, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.n_mels = n_mels

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 4 or mel.shape[1] != 1 or mel.shape[2] != self.n_mels:
            raise ValueError(f"expected (B, 1, {self.n_mels}, T), got {tuple(mel.shape)}")
        lengths = lengths.to(mel.device)
        x = torch.cat([self.conv_time(self.pad_time(mel)), self.conv_freq(self.pad_freq(mel))], dim=1)
        x = _mask_time(torch.relu(self.bn_in(x)), lengths)  # (B, 16, M, T)
        for block in self.blocks:  # (B, 32, M/2, T/2) -> (B, 48, M/4, T/4) -> 64 -> 80
            x = block(x)
            lengths = lengths // 2 if isinstance(block.pool, nn.MaxPool2d) else lengths
            x = _mask_time(x, lengths)  # padded frames back to 0: batching never changes a result
        x = self.freq_pool(x)  # (B, 80, F, T/4)
        b, c, f, t = x.shape
        x = x.reshape(b, c * f, t)  # (B, 80F, T')
        valid = torch.clamp(lengths, min=1, max=t)
        x = x.sum(-1) / valid[:, None].to(x.dtype)  # masked mean over valid frames, (B, 80F)
        return self.dropout(torch.relu(self.fc(x)))  # (B, out_dim)


def _mask_time(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero every time frame at or past each item's valid length. x (B, C, F, T), lengths (B,)."""
    mask = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]  # (B, T)
    return x * mask[:, None, None, :].to(x.dtype)
