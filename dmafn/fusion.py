"""Fusion layers: modality embeddings (B, M, d) and a presence mask (B, M) -> one (B, d) representation.

- AttentionFusion: intermediate cross-modal attention, a transformer over modality tokens; absent
  modalities are masked out of attention and pooling.
- GatedFusion: a learned gate per modality token, softmax over the present ones, weighted sum.
- EarlyFusion: the aligned inputs (their reconstruction targets, zeros where absent) and the mask are
  concatenated at the input level into one network; modality encoders are not used.
- Late fusion has no fusion layer: `DMAFN` runs one detector per modality and votes on the scores.
"""
from __future__ import annotations

import torch
from torch import nn


def _safe_mask(mask: torch.Tensor) -> torch.Tensor:
    """A row with no present modality would make attention NaN: let it attend to everything (all zeros)."""
    empty = ~mask.any(1, keepdim=True)
    return mask | empty


class AttentionFusion(nn.Module):
    def __init__(self, n_modalities: int, d_model: int, layers: int = 2, heads: int = 4):
        super().__init__()
        self.modality_embedding = nn.Parameter(torch.randn(1, n_modalities, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = _safe_mask(mask)                                           # (B, M)
        h = self.transformer(tokens + self.modality_embedding, src_key_padding_mask=~mask)  # (B, M, d)
        weights = mask.float().unsqueeze(-1)
        return self.norm((h * weights).sum(1) / weights.sum(1))           # (B, d)

    def leave_one_out(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(M*B, d): block i of the rows is `forward` with modality i hidden, for every i in one pass.

        A hidden token is taken out of the sequence instead of masked: nothing attends to it and the pooling
        skips it, so the result is the same for every row where another modality is present, at (M-1)/M of
        the cost. Rows with nothing else present are undefined (the caller discards them)."""
        b, n, d = tokens.shape
        keep = torch.ones(n, n, dtype=torch.bool, device=tokens.device).fill_diagonal_(False)   # row i: all but i
        others = keep.nonzero()[:, 1].view(n, n - 1)                                            # (M, M-1) indices
        placed = (tokens + self.modality_embedding)[:, others]                                  # (B, M, M-1, d)
        placed = placed.transpose(0, 1).reshape(n * b, n - 1, d)                                # (M*B, M-1, d)
        present = _safe_mask(mask[:, others].transpose(0, 1).reshape(n * b, n - 1))             # (M*B, M-1)
        h = self.transformer(placed, src_key_padding_mask=~present)                             # (M*B, M-1, d)
        weights = present.float().unsqueeze(-1)
        return self.norm((h * weights).sum(1) / weights.sum(1))                                 # (M*B, d)


class GatedFusion(nn.Module):
    def __init__(self, n_modalities: int, d_model: int):
        super().__init__()
        self.project = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_modalities))
        self.gate = nn.Linear(n_modalities * d_model, n_modalities)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = tokens * mask.unsqueeze(-1)                              # absent tokens are zero
        projected = torch.stack([p(tokens[:, i]) for i, p in enumerate(self.project)], 1)  # (B, M, d)
        logits = self.gate(tokens.flatten(1)).masked_fill(~_safe_mask(mask), float("-inf"))
        weights = torch.softmax(logits, 1).unsqueeze(-1)                  # (B, M, 1)
        return self.norm((torch.tanh(projected) * weights).sum(1))        # (B, d)


class EarlyFusion(nn.Module):
    def __init__(self, input_dims: list[int], d_model: int):
        super().__init__()
        total = sum(input_dims) + len(input_dims)
        self.net = nn.Sequential(nn.Linear(total, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.LayerNorm(d_model))

    def forward(self, inputs: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        parts = [x * mask[:, i:i + 1] for i, x in enumerate(inputs)]     # each (B, D_m), zero when absent
        return self.net(torch.cat([*parts, mask.float()], 1))             # (B, d)
