"""A transformer encoder's forward pass on its own `nn.TransformerEncoder` weights, through
`F.scaled_dot_product_attention`, with an option to compute only the first positions of the last layer.

Same mathematics and parameters as `nn.TransformerEncoder` (checkpoints are unchanged); two savings:
- a padding mask goes to scaled-dot-product attention instead of the native path's masked softmax, which on
  CPU costs more than the attention itself for log windows of tens of tokens (the text encoder uses this);
  for the 4-6 modality tokens of the fusion the native path is faster, so `AttentionFusion` keeps it;
- an encoder read out at a [CLS] position (`outputs=1`) computes the last layer's attention query, output
  projection and feed-forward for that position only: the other positions' outputs would be thrown away.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def encoder_layer(layer: nn.TransformerEncoderLayer, h: torch.Tensor, pad: torch.Tensor | None,
                  outputs: int | None = None) -> torch.Tensor:
    """One batch-first `TransformerEncoderLayer` over h (B, T, d); `pad` (B, T) True = padding key.

    Returns (B, T, d), or (B, outputs, d): the first `outputs` positions only."""
    attn = layer.self_attn
    b, t, d = h.shape
    heads = attn.num_heads
    x = layer.norm1(h) if layer.norm_first else h
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    query_rows = x if outputs is None else x[:, :outputs]
    q = F.linear(query_rows, w[:d], bias[:d]).view(b, -1, heads, d // heads).transpose(1, 2)   # (B, H, Q, d/H)
    kv = F.linear(x, w[d:], bias[d:]).view(b, t, 2, heads, d // heads).permute(2, 0, 3, 1, 4)  # (2, B, H, T, d/H)
    keep = None if pad is None else ~pad[:, None, None, :]                                   # (B, 1, 1, T)
    a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=keep,
                                       dropout_p=attn.dropout if layer.training else 0.0)    # (B, H, Q, d/H)
    a = layer.dropout1(attn.out_proj(a.transpose(1, 2).reshape(b, -1, d)))                 # (B, Q, d)
    residual = h if outputs is None else h[:, :outputs]

    def feed_forward(y: torch.Tensor) -> torch.Tensor:
        return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(y)))))

    if layer.norm_first:
        y = residual + a
        return y + feed_forward(layer.norm2(y))
    y = layer.norm1(residual + a)
    return layer.norm2(y + feed_forward(y))


def encode(encoder: nn.TransformerEncoder, h: torch.Tensor, pad: torch.Tensor | None = None,
           outputs: int | None = None) -> torch.Tensor:
    """`encoder(h, src_key_padding_mask=pad)` (B, T, d); with `outputs`, only the first positions (B, outputs, d)."""
    layers = list(encoder.layers)
    for i, layer in enumerate(layers):
        h = encoder_layer(layer, h, pad, outputs if i == len(layers) - 1 else None)
    return h if encoder.norm is None else encoder.norm(h)
