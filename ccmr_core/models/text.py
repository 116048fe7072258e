"""Report text: a byte-level tokenizer whose vocabulary is fixed by the code, and a small
transformer encoder trained from random initialisation.

Why bytes: a vocabulary learnt from one hospital's reports would carry that hospital's words to
every other site (and to the coordinator) inside the model, and so would the rows of an
embedding table that only one site's reports ever update. Here text is first folded to ASCII
(NFKD, accents dropped), so the embedding has one row per ASCII character plus three specials;
every site's reports use the same letters, digits and punctuation, and no row belongs to one site.
The price is length (a report is a few hundred bytes): a strided convolution reads bytes in
groups of four before the transformer.
"""

from __future__ import annotations

import unicodedata

import torch
from torch import nn

PAD, CLS, EOS = 128, 129, 130
VOCAB = 131  # 128 ASCII codes + PAD, CLS, EOS
MAX_BYTES = 768


def encode(texts: list[str], max_len: int = MAX_BYTES) -> torch.Tensor:
    """(B, max_len) int64: CLS, the ASCII bytes of each text (truncated), EOS, then PAD."""
    out = torch.full((len(texts), max_len), PAD, dtype=torch.long)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"report {i}: expected text, got {type(t).__name__}")
        b = unicodedata.normalize("NFKD", t).encode("ascii", "ignore")[: max_len - 2]
        ids = [CLS, *b, EOS]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def decode(ids: torch.Tensor) -> str:
    return bytes(int(i) for i in ids if int(i) < 128).decode("ascii")


class TextEncoder(nn.Module):
    """(B, L) byte ids -> (B, width): byte embedding, a stride-4 convolution (groups of four
    bytes), learned positions, a pre-norm transformer, mean over the non-padding positions (as
    CMR-CLIP pools its BERT)."""

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, max_len: int = MAX_BYTES,
                 stride: int = 4, dropout: float = 0.1):
        super().__init__()
        self.stride = stride
        self.embed = nn.Embedding(VOCAB, width, padding_idx=PAD)
        self.group = nn.Conv1d(width, width, stride, stride)
        self.pos = nn.Parameter(torch.zeros(1, max_len // stride, width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.width = width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        n = n - n % self.stride
        ids = ids[:, :n]
        x = self.group(self.embed(ids).transpose(1, 2)).transpose(1, 2)  # (B, n/stride, W)
        keep = (ids != PAD).reshape(b, -1, self.stride).any(-1)  # a group with any byte is real
        x = x + self.pos[:, : x.shape[1]]
        x = self.transformer(x, src_key_padding_mask=~keep)
        w = keep.unsqueeze(-1).float()
        return self.norm((x * w).sum(1) / w.sum(1).clamp_min(1.0))
