"""Report text: a byte-level tokenizer whose vocabulary is fixed by the code, and a small
transformer encoder trained from random initialisation.

Why bytes: a vocabulary learnt from one hospital's reports would carry that hospital's words to
every other site (and to the coordinator) inside the model, and so would the rows of an
embedding table that only one site's reports ever update. Here text is first folded to ASCII
(NFKD, accents dropped), so the embedding has one row per ASCII character plus three specials;
every site's reports use the same letters, digits and punctuation, and no row belongs to one site.
The price is length (a report is a few hundred bytes): a strided convolution reads bytes in
groups of four before the transformer.

Negation: "No late gadolinium enhancement" shares every byte of "late gadolinium enhancement" but
two words, and a text encoder trained from scratch on a few hundred reports placed them side by side
(BENCHMARKS, CMR-CLIP block: scored against its negation, wall motion fell below chance). So the
tokenizer marks the bytes inside a negation's scope, with the rules of NegEx (Chapman et al. 2001;
the cues and clause ends below, fixed by the code like the byte vocabulary, so no site's wording is
learnt into them): a cue such as "no" or "without" negates up to the end of its clause, a trailing
"none" or "absent" ("DE: none") back to the start of its sentence. A marked byte's id is its byte
plus ``NEGATED``; the encoder adds one learned vector to the embedding of every marked byte
(``TextEncoder(negation=True)``), or ignores the mark (a model trained before it existed).
"""

from __future__ import annotations

import re
import unicodedata

import torch
from torch import nn

PAD, CLS, EOS = 128, 129, 130
VOCAB = 131  # 128 ASCII codes + PAD, CLS, EOS
MAX_BYTES = 768
NEGATED = 256  # added to the id of a byte inside a negation's scope

# NegEx-style rules (Chapman et al. 2001), the cues of cardiology reports. A clause ends at . ; , ! ?
# followed by a space (so "2.5 mm" does not end one) or at a contrastive conjunction.
_PRE = re.compile(r"\b(?:no|not|without|absence of|negative for|free of|never|nor)\b", re.I)
_POST = re.compile(r"\b(?:none|absent|not seen|ruled out|excluded)\b", re.I)
_CLAUSE_END = re.compile(r"[.;,!?](?=\s|$)|\b(?:but|however|although|except|apart from)\b", re.I)
_SENTENCE_END = re.compile(r"[.;!?](?=\s|$)")


def negated_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of ``text`` inside a negation's scope: from a preceding cue
    ("no", "without", ...) to the end of its clause, or from the start of the sentence to a
    trailing cue ("DE: none")."""
    spans = []
    for m in _PRE.finditer(text):
        end = _CLAUSE_END.search(text, m.end())
        spans.append((m.start(), end.start() if end else len(text)))
    for m in _POST.finditer(text):
        starts = [e.end() for e in _SENTENCE_END.finditer(text, 0, m.start())]
        spans.append((starts[-1] if starts else 0, m.end()))
    return spans


def encode(texts: list[str], max_len: int = MAX_BYTES) -> torch.Tensor:
    """(B, max_len) int64: CLS, the ASCII bytes of each text (truncated; a byte inside a negation's
    scope plus ``NEGATED``), EOS, then PAD."""
    out = torch.full((len(texts), max_len), PAD, dtype=torch.long)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"report {i}: expected text, got {type(t).__name__}")
        a = unicodedata.normalize("NFKD", t).encode("ascii", "ignore")[: max_len - 2]
        b = torch.tensor(list(a), dtype=torch.long)
        negated = torch.zeros(len(b), dtype=torch.bool)
        for s, e in negated_spans(a.decode("ascii")):
            negated[s:e] = True  # overlapping scopes mark a byte once
        out[i, 0], out[i, 1: len(b) + 1], out[i, len(b) + 1] = CLS, b + NEGATED * negated, EOS
    return out


def negation_mask(ids: torch.Tensor) -> torch.Tensor:
    return ids >= NEGATED


def decode(ids: torch.Tensor) -> str:
    """The text of byte ids (specials and negation marks dropped)."""
    return bytes(int(i) % NEGATED for i in ids if int(i) % NEGATED < 128).decode("ascii")


class TextEncoder(nn.Module):
    """(B, L) byte ids -> (B, width): byte embedding, a stride-4 convolution (groups of four
    bytes), learned positions, a pre-norm transformer, then one vector per text: ``pool`` "mean"
    over the non-padding positions (as CMR-CLIP pools its BERT), or "attention": one learned query
    attends over them (an attentional pooler, as CoCa's), so that the few groups that differ
    between reports of one template (the numbers, "no LGE") can outweigh the template, and a short
    prompt and a long report that share a finding can meet. ``negation``: add a learned vector to
    every byte inside a negation's scope (an nn.Embedding of two rows, the first zero, so Opacus
    accepts it as it is); without it the marks are ignored."""

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, max_len: int = MAX_BYTES,
                 stride: int = 4, dropout: float = 0.1, negation: bool = False, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "attention"):
            raise ValueError(f"text pooling {pool!r}: choose 'mean' or 'attention'")
        self.stride = stride
        self.embed = nn.Embedding(VOCAB, width, padding_idx=PAD)
        self.negation = nn.Embedding(2, width, padding_idx=0) if negation else None
        self.group = nn.Conv1d(width, width, stride, stride)
        self.pos = nn.Parameter(torch.zeros(1, max_len // stride, width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.width = width
        self.pool = pool
        if pool == "attention":
            self.query = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.normal_(self.query, std=0.02)
            self.pool_attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        n = n - n % self.stride
        ids = ids[:, :n]
        neg = negation_mask(ids)
        ids = ids % NEGATED
        e = self.embed(ids)
        if self.negation is not None:
            e = e + self.negation(neg.long())
        x = self.group(e.transpose(1, 2)).transpose(1, 2)  # (B, n/stride, W)
        keep = (ids != PAD).reshape(b, -1, self.stride).any(-1)  # a group with any byte is real
        x = x + self.pos[:, : x.shape[1]]
        x = self.transformer(x, src_key_padding_mask=~keep)
        if self.pool == "attention":
            q = self.query.expand(b, -1, -1)
            return self.norm(self.pool_attn(q, x, x, key_padding_mask=~keep, need_weights=False)[0][:, 0])
        w = keep.unsqueeze(-1).float()
        return self.norm((x * w).sum(1) / w.sum(1).clamp_min(1.0))
