"""The edge zoo's text task machinery on a small random MiniLM (no download).

The real task (all-MiniLM-L6-v2 on Rotten Tomatoes snippets) is built by
``scripts/edge_minilm.py``; these tests check what it relies on: the safetensors reader,
the WordPiece tokenizer, vocabulary trimming that embeds exactly as before, FFN thinning
that removes neurons, and an export whose mask is read once and whose cuts between
layers carry exactly the hidden state and the extended mask.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
torch = pytest.importorskip("torch")

import edge_bert as eb  # noqa: E402
import edge_minilm as emi  # noqa: E402

from loom.model.cuts import GraphIndex, candidate_cuts  # noqa: E402

SEQ = 12


def test_safetensors_reader_reads_what_was_written(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, -1], dtype=np.int64)
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}, "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    (tmp_path / "w.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + a.tobytes() + b.tobytes())
    got = eb.read_safetensors(tmp_path / "w.safetensors")
    assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b) and set(got) == {"a", "b"}


@pytest.fixture()
def tokenizer(tmp_path: Path) -> eb.WordPiece:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "film", "is", "dull", "##y", "fun", "!", "cafe"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return eb.WordPiece(tmp_path / "vocab.txt")


def test_wordpiece_lowercases_splits_and_pads(tokenizer: eb.WordPiece) -> None:
    assert tokenizer.encode("The FILM is dully fun!") == [4, 5, 6, 7, 8, 9, 10]
    assert tokenizer.encode("Café zzz") == [11, 1]  # accents stripped; unknown word -> [UNK]
    ids, mask = tokenizer.batch(["the film", "the film is dull the film is dull"], 6)
    assert ids.tolist() == [[2, 4, 5, 3, 0, 0], [2, 4, 5, 6, 7, 3]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]


def small_minilm() -> eb.MiniLM:
    torch.manual_seed(0)
    model = eb.MiniLM(2, SEQ, layers=[eb.Layer() for _ in range(2)])
    emi.trim_embeddings(model, np.arange(40))  # a 40-piece vocabulary
    return model.eval()


def tokens(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = (np.arange(SEQ)[None] < rng.integers(3, SEQ + 1, n)[:, None]).astype(np.int64)
    return rng.integers(1, 40, (n, SEQ)) * mask, mask


def test_trimmed_vocabulary_embeds_exactly_as_before() -> None:
    torch.manual_seed(0)
    full = eb.MiniLM(2, SEQ, layers=[eb.Layer()]).eval()
    ids, mask = tokens()
    ids[0, 1] = 29000  # a piece far up the vocabulary
    kept = np.unique(np.concatenate([ids.reshape(-1), [0, 1, 2, 3]]))
    remap = np.zeros(eb.VOCAB, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    trimmed = eb.MiniLM(2, SEQ, layers=[eb.Layer()]).eval()
    trimmed.load_state_dict(full.state_dict())
    emi.trim_embeddings(trimmed, kept)
    with torch.no_grad():
        want = full(torch.from_numpy(ids), torch.from_numpy(mask))
        got = trimmed(torch.from_numpy(remap[ids]), torch.from_numpy(mask))
    assert trimmed.embeddings.word.num_embeddings == len(kept)
    torch.testing.assert_close(got, want)


def test_ffn_thinning_removes_neurons() -> None:
    model = small_minilm()
    thin, removed = emi.thin_ffn(model, 0.25)
    assert [layer.ffn_in.out_features for layer in thin.layers] == [eb.FFN - eb.FFN // 4] * 2
    assert 0.1 < removed < 0.2  # a quarter of the FFN, which is 2/3 of each layer's weights
    ids, mask = tokens()
    with torch.no_grad():
        assert thin(torch.from_numpy(ids), torch.from_numpy(mask)).shape == (6, 2)


def test_export_reads_the_mask_once_and_cuts_carry_it(tmp_path: Path) -> None:
    import onnx

    model = small_minilm()
    ids, mask = tokens()
    emi.export_onnx(model, tmp_path / "m.onnx", (ids, mask))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert sum("attention_mask" in n.input for n in proto.graph.node) == 1
    extended = next(n.output[0] for n in proto.graph.node if n.op_type == "Where")  # 0 or -1e4 per token
    cuts = candidate_cuts(GraphIndex.build(proto))
    between = [c for c in cuts if 0.3 < c.macs_before < 0.7]
    # between the layers: the hidden state and the extended mask, which every layer reads
    assert between and all(c.produced == 2 and extended in c.tensors for c in between), [c.tensors for c in cuts]
