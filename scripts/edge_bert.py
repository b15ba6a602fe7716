"""A BERT encoder for the edge zoo's text task, with its tokenizer and weight reader.

``MiniLM`` is the architecture of sentence-transformers' all-MiniLM-L6-v2 (a 6-layer,
384-wide uncased BERT; Apache-2.0): token + position + token-type embeddings, post-norm
encoder layers, mean pooling over the attention mask, then a linear head. Written for
export: the additive attention mask is computed once at the top and the very same tensor
is read by every layer and by the pooling, so a cut between two layers is crossed by
exactly two float tensors (hidden state, extended mask); no shape in the graph names the
batch size. ``WordPiece`` is BERT's uncased tokenizer (basic tokenizer + greedy WordPiece)
in plain Python, and ``read_safetensors`` reads a ``.safetensors`` file with numpy alone.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import torch
from torch import nn

HIDDEN = 384
HEAD_DIM = 32
LAYERS = 6
HEADS = 12
FFN = 1536
VOCAB = 30522
EPS = 1e-12
#: the additive mask's value at padding: -10000 (BERT's original) rather than the float32
#: minimum, which an fp16 variant would turn into -inf and then 0 * -inf = NaN
MASKED = -10000.0

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file: 8-byte little-endian header length, a JSON
    header (name -> dtype, shape, [begin, end) offsets into the data), then the raw bytes."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    base = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        arr = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=base + begin)
        out[name] = arr.reshape(info["shape"]).astype(dtype.newbyteorder("="))
    return out


class WordPiece:
    """BERT's uncased tokenizer: clean, split CJK, lower-case, strip accents, split on
    whitespace and punctuation, then greedy longest-match WordPiece over ``vocab.txt``."""

    def __init__(self, vocab_file: Path, max_word: int = 100) -> None:
        tokens = vocab_file.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.max_word = max_word
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad, self.unk = self.vocab["[PAD]"], self.vocab["[UNK]"]

    @staticmethod
    def _punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    @staticmethod
    def _cjk(cp: int) -> bool:
        return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
                or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
                or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)

    def basic(self, text: str) -> list[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp in (0, 0xFFFD):
                continue
            cat = unicodedata.category(ch)
            if ch in " \t\n\r" or cat == "Zs":
                chars.append(" ")
            elif cat in ("Cc", "Cf"):
                continue
            elif self._cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        words = []
        for word in "".join(chars).lower().split():
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            piece = ""
            for ch in word:
                if self._punct(ch):
                    if piece:
                        words.append(piece)
                    words.append(ch)
                    piece = ""
                else:
                    piece += ch
            if piece:
                words.append(piece)
        return words

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_word:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    ids.append(self.vocab[sub])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for w in self.basic(text) for i in self.wordpiece(w)]

    def batch(self, texts: list[str], seq: int) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` and ``attention_mask`` (int64, N x seq): [CLS] text [SEP], truncated
        to ``seq`` and padded with [PAD]."""
        ids = np.full((len(texts), seq), self.pad, dtype=np.int64)
        mask = np.zeros((len(texts), seq), dtype=np.int64)
        for i, t in enumerate(texts):
            row = [self.cls, *self.encode(t)[:seq - 2], self.sep]
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask


class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Embedding(512, HIDDEN)
        self.token_type = nn.Embedding(2, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, input_ids: torch.Tensor, seq: int) -> torch.Tensor:
        # positions 0..seq-1 and token type 0: constants of the graph (folded at export)
        fixed = self.position.weight[:seq] + self.token_type.weight[0]
        return self.norm(self.word(input_ids) + fixed)


class Layer(nn.Module):
    """One post-norm BERT layer; ``heads`` and ``ffn`` may be fewer than 12 and 1536 (a
    structured variant: whole heads or intermediate neurons sliced away)."""

    def __init__(self, heads: int = HEADS, ffn: int = FFN) -> None:
        super().__init__()
        self.heads = heads
        width = heads * HEAD_DIM
        self.query = nn.Linear(HIDDEN, width)
        self.key = nn.Linear(HIDDEN, width)
        self.value = nn.Linear(HIDDEN, width)
        self.attn_out = nn.Linear(width, HIDDEN)
        self.attn_norm = nn.LayerNorm(HIDDEN, eps=EPS)
        self.ffn_in = nn.Linear(HIDDEN, ffn)
        self.ffn_out = nn.Linear(ffn, HIDDEN)
        self.ffn_norm = nn.LayerNorm(HIDDEN, eps=EPS)
        self.act = nn.GELU()

    def forward(self, h: torch.Tensor, ext: torch.Tensor, seq: int) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:  # B x S x (H*D) -> B x H x S x D
            return x.reshape(-1, seq, self.heads, HEAD_DIM).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (HEAD_DIM ** -0.5) + ext
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        ctx = ctx.transpose(1, 2).reshape(-1, seq, self.heads * HEAD_DIM)
        h = self.attn_norm(h + self.attn_out(ctx))
        return self.ffn_norm(h + self.ffn_out(self.act(self.ffn_in(h))))


class Standardize(nn.Module):
    """``(x - mean) / std`` per feature, with constant statistics: the first half of a head
    fitted on standardized features, kept apart so that its Linear has well-scaled weights."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MiniLM(nn.Module):
    """``input_ids``, ``attention_mask`` (int64, B x seq) -> ``logits`` (B x classes), or the
    pooled 384 features when ``head`` is ``None``. ``seq`` is a Python int (64 at export; the
    feature pass may set it lower per batch, which leaves the pooled features unchanged)."""

    def __init__(self, classes: int = 2, seq: int = 64, layers: list[Layer] | None = None) -> None:
        super().__init__()
        self.seq = seq
        self.embeddings = Embeddings()
        self.layers = nn.ModuleList(layers if layers is not None else [Layer() for _ in range(LAYERS)])
        self.head: nn.Module | None = nn.Linear(HIDDEN, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = self.seq
        # computed once, read by every layer: 0 where a token is, MASKED at padding
        # (a Where, not a Cast of the int64 mask to float: the fp16 converter would retype
        # that Cast's output without changing its target type)
        ext = torch.where(attention_mask.reshape(-1, 1, 1, seq) == 0, MASKED, 0.0)
        h = self.embeddings(input_ids, seq)
        for layer in self.layers:
            h = layer(h, ext, seq)
        # mean pooling (sentence-transformers): the token weights come from ext itself
        # (exactly 1 or 0), so the raw mask is not read again past the first layer
        w = 1.0 - ext.reshape(-1, seq, 1) / MASKED
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
        return pooled if self.head is None else self.head(pooled)


def load_minilm(weights: Path, classes: int = 2, seq: int = 64) -> MiniLM:
    """A ``MiniLM`` with the encoder weights of a sentence-transformers BERT checkpoint
    (HF ``BertModel`` names; the unused pooler is dropped) and a zero head."""
    sd = read_safetensors(weights)
    names = {"embeddings.word": "embeddings.word_embeddings", "embeddings.position": "embeddings.position_embeddings",
             "embeddings.token_type": "embeddings.token_type_embeddings", "embeddings.norm": "embeddings.LayerNorm"}
    per_layer = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
    for i in range(LAYERS):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}"] = f"encoder.layer.{i}.{theirs}"
    model = MiniLM(classes, seq)
    state = {}
    for key in model.state_dict():
        if key.startswith("head."):
            continue
        prefix, _, leaf = key.rpartition(".")
        state[key] = torch.from_numpy(sd[f"{names[prefix]}.{leaf}"])
    missing = model.load_state_dict(state, strict=False).missing_keys
    if sorted(missing) != ["head.bias", "head.weight"]:
        raise RuntimeError(f"weights missing from {weights.name}: {missing}")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    return model.eval()
