"""Encoders, one per modality kind. Each maps its input to a (B, d) embedding and defines the
reconstruction target (B, D) that detector heads predict for that modality.

Kinds and networks: tabular/sensor -> MLP; timeseries -> GRU | LSTM | TCN | transformer;
image -> CNN; text -> transformer (or embedding bag) over hashed tokens; audio -> log-mel CNN.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmafn.features import TEXT_VOCAB
from dmafn.layers import encode

TEXT_TARGET_BUCKETS = 64
NOVELTY_COLUMNS = 2          # text inputs' extra columns: unseen-template lines, unseen tokens
IMAGE_GRID = 4            # an image embedding's grid of places (rows = columns), model versions with `grid`
TEXT_CHUNK = 256          # text windows encoded together (sorted by length, trimmed to the chunk's longest)


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, ...) the distinct rows of x (B, ...) and (B,) each row's index among them.

    Ticks in order repeat a row many times in a row (the latest camera frame, a quiet log window): runs of
    equal neighbours are collapsed first (one vectorised comparison), then the remaining rows de-duplicated."""
    flat = x.flatten(1)
    starts = torch.ones(len(x), dtype=torch.bool, device=x.device)
    starts[1:] = (flat[1:] != flat[:-1]).any(1)                          # (B,) a row unlike the one before
    distinct, index = torch.unique(flat[starts], dim=0, return_inverse=True)
    return distinct.view(-1, *x.shape[1:]), index[starts.cumsum(0) - 1]


def first_token(pad: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's first non-padding column (T for an all-padding row)."""
    columns = torch.arange(pad.shape[1], device=pad.device).expand_as(pad)
    return torch.where(pad, pad.shape[1], columns).min(1).values


class TabularEncoder(nn.Module):
    """MLP over a vector of sensor values; target: the values themselves."""

    def __init__(self, n_columns: int, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_columns, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.target_dim = n_columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C) -> (B, d)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def target_weights(self, channels: torch.Tensor) -> torch.Tensor:
        """(B, C) channels held -> (B, C) weights of the target's dimensions."""
        return channels.float()

    def channel_means(self, squared: torch.Tensor) -> torch.Tensor:
        """(B, C) squared errors of the target -> (B, C) each channel's mean."""
        return squared

    def hide_channels(self, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """(B, C) inputs, (B, C) channels kept -> the inputs with the others at 0 (a missing channel's value)."""
        return x * channels.to(x.dtype)


class _TCN(nn.Module):
    """Causal dilated 1-D convolutions with residuals."""

    def __init__(self, channels: int, d_model: int, levels: int = 3, kernel: int = 3):
        super().__init__()
        self.inp = nn.Conv1d(channels, d_model, 1)
        self.blocks = nn.ModuleList(
            nn.Conv1d(d_model, d_model, kernel, dilation=2 ** i) for i in range(levels))
        self.kernel = kernel

    def states(self, x: torch.Tensor) -> torch.Tensor:
        """The state after every step (B, d, L): step t sees steps <= t only."""
        h = self.inp(x.transpose(1, 2))                                   # (B, d, L)
        for i, conv in enumerate(self.blocks):
            pad = (self.kernel - 1) * 2 ** i
            h = h + F.gelu(conv(F.pad(h, (pad, 0))))                      # causal: pad on the left only
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.states(x)[:, :, -1]                                   # (B, d): the state at the tick


class SeriesEncoder(nn.Module):
    """A window of a multichannel series (B, L, C); target: the window, pooled to at most 32 steps."""

    def __init__(self, channels: int, steps: int, d_model: int, cell: str = "gru"):
        super().__init__()
        self.cell, self.steps, self.channels = cell, steps, channels
        if cell in ("gru", "lstm"):
            self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(channels, d_model, batch_first=True)
        elif cell == "tcn":
            self.tcn = _TCN(channels, d_model)
        elif cell == "transformer":
            self.inp = nn.Linear(channels, d_model)
            self.pos = nn.Parameter(torch.randn(1, steps, d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, batch_first=True)
            self.transformer = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            raise ValueError(f"unknown series encoder {cell!r} (gru, lstm, tcn, transformer)")
        self.pooled_steps = min(steps, 32)
        self.target_dim = self.pooled_steps * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cell in ("gru", "lstm"):
            out, _ = self.rnn(x)                                          # (B, L, d)
            return out[:, -1]
        if self.cell == "tcn":
            return self.tcn(x)
        h = self.transformer(self.inp(x) + self.pos[:, : x.shape[1]])     # (B, L, d)
        return h.mean(1)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool1d(x.transpose(1, 2), self.pooled_steps)  # (B, C, L')
        return pooled.flatten(1)

    def target_weights(self, channels: torch.Tensor) -> torch.Tensor:
        """(B, C) channels held -> (B, C * L') weights of the target's dimensions (channel-major, as `target`)."""
        return channels.float().repeat_interleave(self.pooled_steps, 1)

    def channel_means(self, squared: torch.Tensor) -> torch.Tensor:
        """(B, C * L') squared errors of the target -> (B, C) each channel's mean over its pooled steps."""
        return squared.view(squared.shape[0], self.channels, self.pooled_steps).mean(2)

    def hide_channels(self, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """(B, L, C) inputs, (B, C) channels kept -> the inputs with the others at 0 (a missing channel's value)."""
        return x * channels.to(x.dtype).unsqueeze(1)


class ImageEncoder(nn.Module):
    """CNN over (B, ch, H, W) in [0, 1]; target: the image pooled to 16x16.

    With `grid` (model versions since 2026-12-02) the last feature maps are pooled to a 4x4 grid that a linear
    layer reads cell by cell, so the embedding keeps where things are in the frame (a needle's angle, a part's
    place); without it they are averaged over the whole frame (older versions), which keeps only which
    patterns occur. Any frame size works: the grid adapts to the maps' size."""

    def __init__(self, channels: int, d_model: int, grid: bool = False):
        super().__init__()
        cells = IMAGE_GRID * IMAGE_GRID if grid else 1
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(IMAGE_GRID if grid else 1), nn.Flatten(),   # (B, 64 * cells)
            nn.Linear(64 * cells, d_model))
        self.target_dim = channels * 16 * 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and len(x) > 1:
            # scoring: a frame is the latest one for many ticks in a row; encode each distinct frame once
            distinct, index = distinct_rows(x)                                # (U, ch, H, W), (B,)
            if len(distinct) < len(x):
                return self.net(distinct * 2 - 1)[index]                      # (B, d)
        return self.net(x * 2 - 1)                                        # (B, ch, H, W) -> (B, d)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return (F.adaptive_avg_pool2d(x, 16) * 4 - 2).flatten(1)          # (B, ch*256), roughly unit scale


class TextEncoder(nn.Module):
    """Transformer (or mean embedding bag) over hashed token ids (B, T), 0 = padding.

    Target: log counts of tokens in 64 hash buckets (the bag of words, compressed). With `novelty`, the inputs
    carry two more columns (B, T + 2) - the window's lines with a template unseen in training and its unseen
    tokens (`features.TextVocabulary`) - and the target adds their log counts: they are never seen in training,
    so the head learns to expect none and a window full of new lines reconstructs badly. The encoder reads the
    token ids only.
    """

    def __init__(self, d_model: int, kind: str = "transformer", max_tokens: int = 64, vocab: int = TEXT_VOCAB,
                 novelty: bool = False):
        super().__init__()
        if kind not in ("transformer", "bag"):
            raise ValueError(f"unknown text encoder {kind!r} (transformer, bag)")
        self.kind, self.max_tokens, self.novelty = kind, max_tokens, novelty
        self.embed = nn.Embedding(vocab, d_model, padding_idx=0)
        self.cls = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        if kind == "transformer":
            self.pos = nn.Parameter(torch.randn(1, max_tokens + 1, d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, batch_first=True)
            self.transformer = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, d_model)
        self.target_dim = TEXT_TARGET_BUCKETS + (NOVELTY_COLUMNS if novelty else 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens[:, :self.max_tokens]                              # (B, T): ids, novelty columns dropped
        if self.kind == "transformer" and len(tokens) > 1:
            # a log window is the same for many ticks in a row (often empty): encode each distinct one once
            distinct, index = distinct_rows(tokens)                           # (U, T), (B,)
            if len(distinct) < len(tokens):
                return self._encode(distinct)[index]                      # (B, d)
        return self._encode(tokens)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0                                                 # (B, T)
        if self.kind == "bag":
            h = self.embed(tokens)                                        # (B, T, d)
            count = (~pad).sum(1, keepdim=True).clamp(min=1)
            return self.out(h.sum(1) / count + torch.log1p(count.float()) * self.cls[0])
        # windows sorted by length, a chunk at a time, each chunk without the leading columns that are padding
        # in all its rows: attention costs grow with the square of the columns, and padded keys add nothing
        lengths = tokens.shape[1] - first_token(pad)                      # (B,)
        order = torch.argsort(lengths, stable=True)
        encoded = [self._encode_columns(tokens[rows], tokens.shape[1] - int(lengths[rows].max()))
                   for rows in order.split(TEXT_CHUNK)]
        return torch.cat(encoded)[torch.argsort(order)]                   # (B, d), in the input's order

    def _encode_columns(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """The transformer over columns `start:` of `tokens`, at their positions in the full window."""
        kept = tokens[:, start:]                                          # (B, T')
        pad = torch.cat([torch.zeros(len(kept), 1, dtype=torch.bool, device=kept.device), kept == 0], 1)  # CLS: never
        h = torch.cat([self.cls.expand(len(kept), -1, -1) + self.pos[:, :1],
                       self.embed(kept) + self.pos[:, start + 1: tokens.shape[1] + 1]], 1)  # (B, T'+1, d)
        cls = encode(self.transformer, h, pad, outputs=1)                 # (B, 1, d): the [CLS] position only
        return self.out(cls[:, 0])

    def target(self, inputs: torch.Tensor) -> torch.Tensor:
        tokens = inputs[:, :self.max_tokens]                              # (B, T)
        buckets = torch.where(tokens > 0, tokens % TEXT_TARGET_BUCKETS, TEXT_TARGET_BUCKETS)      # (B, T)
        counts = torch.zeros(len(tokens), TEXT_TARGET_BUCKETS + 1, device=tokens.device)
        counts.scatter_add_(1, buckets, torch.ones_like(buckets, dtype=counts.dtype))           # (B, 65)
        bag = torch.log1p(counts[:, :-1])                                 # (B, 64)
        if not self.novelty:
            return bag
        novel = inputs[:, self.max_tokens:self.max_tokens + NOVELTY_COLUMNS].float()             # (B, 2) or (B, 0)
        if novel.shape[1] < NOVELTY_COLUMNS:
            raise ValueError("this text encoder expects novelty columns (features fitted with a vocabulary)")
        return torch.cat([bag, torch.log1p(novel)], 1)                    # (B, 66)


AUDIO_MELS = 32     # mel bands of an audio modality's log-mel spectrogram


def audio_fft_size(sample_rate: int) -> int:
    """Samples per frame of the log-mel spectrogram: about 32 ms, a power of two, at least 64."""
    return 1 << max(6, int(math.log2(sample_rate * 0.032)))


def mel_edges(sample_rate: int, n_mels: int) -> np.ndarray:
    """(n_mels + 2,) the mel filters' corner frequencies in Hz, evenly spaced in mels from 20 Hz to Nyquist: filter i
    rises from edge i to its centre, edge i + 1, and falls to edge i + 2."""
    def hz_to_mel(f):
        return 2595 * np.log10(1 + f / 700)

    def mel_to_hz(m):
        return 700 * (10 ** (m / 2595) - 1)

    return mel_to_hz(np.linspace(hz_to_mel(20.0), hz_to_mel(sample_rate / 2), n_mels + 2))


def mel_band_names(sample_rate: int, n_mels: int = AUDIO_MELS) -> tuple[str, ...]:
    """Each mel band of an audio modality named by its centre frequency (`80 Hz`, `1.43 kHz`): how `channel_<m>`
    names the band that drives the modality's error."""
    centres = mel_edges(sample_rate, n_mels)[1:-1]
    return tuple(f"{c / 1000:.2f} kHz" if c >= 1000 else f"{c:.0f} Hz" for c in centres)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> np.ndarray:
    """Triangular mel filters (n_mels, n_fft // 2 + 1)."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_edges(sample_rate, n_mels)
    bank = np.zeros((n_mels, freqs.size), np.float32)
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        bank[i] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return bank


class AudioEncoder(nn.Module):
    """Log-mel spectrogram (torch.stft) and a CNN over (B, S) waveforms.

    Target: per mel band, the mean and standard deviation over time of the log-mel spectrogram; each band's part of
    the error (`channel_means`) says where in the spectrum a clip is unlike the others (`mel_band_names`).
    """

    def __init__(self, sample_rate: int, d_model: int, n_mels: int = AUDIO_MELS):
        super().__init__()
        self.n_mels = n_mels
        self.n_fft = audio_fft_size(sample_rate)                           # ~32 ms frames
        self.hop = self.n_fft // 2
        self.register_buffer("mel", torch.from_numpy(mel_filterbank(self.n_fft, n_mels, sample_rate)))
        self.register_buffer("window", torch.hann_window(self.n_fft))
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, d_model))
        self.target_dim = 2 * n_mels

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave.float(), self.n_fft, self.hop, window=self.window, return_complex=True)
        power = spec.abs() ** 2                                           # (B, F, frames)
        return torch.log1p(torch.einsum("mf,bft->bmt", self.mel, power))  # (B, n_mels, frames)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.net(self.log_mel(wave).unsqueeze(1))                  # (B, S) -> (B, d)

    def target(self, wave: torch.Tensor) -> torch.Tensor:
        mel = self.log_mel(wave)
        return torch.cat([mel.mean(2), mel.std(2)], 1)                    # (B, 2 * n_mels)

    def channel_means(self, squared: torch.Tensor) -> torch.Tensor:
        """(B, 2 * n_mels) squared errors of the target -> (B, n_mels) each mel band's mean over its two (level and
        swing)."""
        return squared.view(squared.shape[0], 2, self.n_mels).mean(1)
