"""Raw stage of the edge zoo's ``word-ocr`` task: PP-OCRv4 text recognition on rendered words.

``python scripts/edge_ocr.py`` writes ``out/edge-raw/ocr`` (downloads cached in
``out/cache/edge``) and prints a summary JSON. Nothing is trained or fine-tuned.

- Model: PaddleOCR's PP-OCRv4 recognition network (``ch_PP-OCRv4_rec_infer.onnx``,
  PP-LCNetV3 backbone + SVTR neck + CTC head, 6625 classes) from the PyPI wheel
  ``rapidocr-onnxruntime`` (Apache-2.0), fetched with ``pip download --no-deps`` and
  unzipped. Its character list is not a file in the wheel: it is the ONNX metadata
  entry ``character`` (6623 lines); RapidOCR prepends the CTC blank (class 0) and
  appends ``' '`` (class 6624), so ``charset.txt`` holds classes 1..6624.
- Input ``x`` float32 [batch, 3, 48, 320] (fixed here; shipped as [?, 3, ?, ?]),
  output [batch, 40, 6625] softmax probabilities, one row per time step.
  Preprocessing as RapidOCR/PaddleOCR do for one crop: resize (bilinear) to height 48
  keeping the aspect ratio, width ceil(48 * w / h) capped at 320 (wider crops are
  squeezed), scale to (x / 255 - 0.5) / 0.5, right-pad with zeros to width 320.
- Data: words from Debian's ``wamerican`` (SCOWL), rendered with Pillow in DejaVu
  (``fonts-dejavu-core``) and Liberation (``fonts-liberation2``) fonts: dark text on a
  light background, seeded font, size, margins, shade, slight rotation, blur and noise.
  Labels are class indices (blank = 0) padded with -1.
- Variants: dense; unstructured magnitude pruning at 10-40% (``loom.model.variants.
  prune_unstructured``; depthwise convs and three sensitive pointwise convs kept dense,
  see ``SENSITIVE``); structured pruning at 10 and 20% that slices hidden neurons of the
  SVTR MLPs and channels of the backbone's conv groups out of the initializers, ranked
  and mean-compensated with statistics of the calibration images (``prune_structured``).

The shipped graph keeps every weight in a ``Constant`` node (Paddle2ONNX); they are
turned into initializers first (same values, same computation) so that the library's
weight tools see them.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:
    import onnxruntime
    import PIL.Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import edge_sources  # noqa: E402

#: the wheel the model comes from, and the model inside it
MODEL_PACKAGE = ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")
#: Debian packages of the data: name -> (file probed under the root, files used)
DEBS = {
    "wamerican": ("usr/share/dict/american-english", ["usr/share/dict/american-english"]),
    "fonts-dejavu-core": ("usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", [
        "usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
        "usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    ]),
    "fonts-liberation2": ("usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf", [
        "usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
        "usr/share/fonts/truetype/liberation2/LiberationSerif-Regular.ttf",
        "usr/share/fonts/truetype/liberation2/LiberationSans-Italic.ttf",
        "usr/share/fonts/truetype/liberation2/LiberationMono-Regular.ttf",
    ]),
}
HEIGHT, WIDTH = 48, 320
EVAL, CALIB = 300, 64
SEED = 0
WORD = re.compile(r"^(?:[a-z]{3,12}|[A-Z][a-z]{2,11})$")
#: rendering: font size in pixels [low, high), least text/background contrast, largest
#: rotation (degrees), blur radius and noise sigma (grey levels)
FONT_PX = (9, 20)  # small, as low-resolution crops are: dense exact match ~87%
CONTRAST = 60
ROTATE, BLUR, NOISE = 2.5, 1.1, 14.0
#: pointwise convs left dense by unstructured pruning, with the depthwise ones: pruning any
#: one of these alone to 40% drops exact match on 64 eval words from 86% to 0% (176, 182)
#: or 64% (170); with every tensor pruned, 20% gives 51% and 30% gives 0%
SENSITIVE = ("conv2d_170.w_0", "conv2d_176.w_0", "conv2d_182.w_0")
UNSTRUCTURED = (0.1, 0.2, 0.3, 0.4)
STRUCTURED = (0.1, 0.2)
Log = Callable[[str], None]


# -- sources ----------------------------------------------------------------------------------
def model_file(cache: Path) -> Path:
    """The shipped recognition ONNX, unzipped (once) from its pinned wheel."""
    package, version, inner = MODEL_PACKAGE
    return edge_sources.wheel_member(package, version, inner, cache / "weights" / Path(inner).name, cache)


def deb_root(package: str, cache: Path) -> Path:
    """``/`` when ``package``'s files are installed, else the package unpacked in the cache."""
    return edge_sources.deb_root(package, DEBS[package][0], cache)


def licences(cache: Path) -> dict[str, str]:
    """Each source's licence as its own metadata states it (wheel METADATA, Debian copyright)."""
    out: dict[str, str] = {}
    package, version, _ = MODEL_PACKAGE
    with zipfile.ZipFile(edge_sources.wheel(package, version, cache)) as z:
        meta = z.read(f"{package.replace('-', '_')}-{version}.dist-info/METADATA").decode()
    found = re.search(r"^License: (.+)$", meta, re.M)
    out[f"{package} {version}"] = found.group(1) if found else "?"
    for deb in DEBS:
        copyright_file = deb_root(deb, cache) / "usr/share/doc" / deb / "copyright"
        text = copyright_file.read_text(errors="replace") if copyright_file.is_file() else ""
        names = re.findall(r"^License: (\S+)", text, re.M)
        if names:
            out[deb] = names[0]  # the first stanza is the upstream files' ("Files: *")
        elif "Permission to use, copy, modify, distribute and sell" in text:
            out[deb] = "SCOWL permissive (copy, modify, distribute and sell, keeping the notice)"
        else:
            out[deb] = "?"
    return out


# -- the model --------------------------------------------------------------------------------
def charset(model: onnx.ModelProto) -> list[str]:
    """Class ``i`` >= 1 is ``charset[i - 1]``: the metadata's characters, then ``' '`` (RapidOCR)."""
    meta = {p.key: p.value for p in model.metadata_props}
    return meta["character"].splitlines() + [" "]


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constants -> initializers, input fixed to [batch, 3, 48, 320], output to [batch, T, C]."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(n.attribute[0].t), n.output[0]))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    dims = g.input[0].type.tensor_type.shape.dim
    dims[0].dim_param = "batch"
    dims[2].dim_value, dims[3].dim_value = HEIGHT, WIDTH
    del g.value_info[:]
    # shape inference cannot follow Paddle2ONNX's Shape/Slice/Concat reshapes: run it once
    steps = predict(out, np.zeros((1, 3, HEIGHT, WIDTH), dtype=np.float32)).shape[1]
    odims = g.output[0].type.tensor_type.shape.dim
    odims[0].dim_param = "batch"
    odims[1].dim_value = steps
    onnx.checker.check_model(out)
    return out


# -- data -------------------------------------------------------------------------------------
def words(cache: Path, chars: Iterable[str], n: int, seed: int = SEED) -> list[str]:
    """``n`` distinct seeded words: lowercase or capitalised ASCII, 3-12 letters, all in ``chars``."""
    path = deb_root("wamerican", cache) / DEBS["wamerican"][1][0]
    known = set(chars)
    pool = sorted({w for w in path.read_text(encoding="utf-8", errors="replace").split()
                   if WORD.match(w) and set(w) <= known})
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), n, replace=False)]


def fonts(cache: Path) -> list[Path]:
    return [deb_root(p, cache) / f for p in DEBS if p.startswith("fonts-") for f in DEBS[p][1]]


def render(word: str, font_path: Path, rng: np.random.Generator) -> PIL.Image.Image:
    """One word crop (a PIL RGB image), as a text detector would hand it to the recognizer."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    size = int(rng.integers(*FONT_PX))
    font = ImageFont.truetype(str(font_path), size)
    left, top, right, bottom = font.getbbox(word)
    mx, my = (int(v) for v in rng.integers(1, 7, 2))
    bg = int(rng.integers(150, 256))
    fg = int(rng.integers(0, max(1, min(110, bg - CONTRAST))))
    img = Image.new("L", (right - left + 2 * mx, bottom - top + 2 * my), bg)
    ImageDraw.Draw(img).text((mx - left, my - top), word, font=font, fill=fg)
    angle = float(rng.uniform(-ROTATE, ROTATE))
    img = img.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=bg)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, BLUR))))
    a = np.asarray(img, dtype=np.float32) + rng.normal(0.0, rng.uniform(2.0, NOISE), (img.height, img.width))
    tint = rng.uniform(0.9, 1.0, 3)  # a slight colour cast (RGB order does not matter here)
    rgb = np.clip(a[..., None] * tint, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def preprocess(img: PIL.Image.Image) -> np.ndarray:
    """RapidOCR's ``resize_norm_img`` for one crop: [3, 48, 320] float32 in [-1, 1], zero right pad."""
    from PIL import Image

    w, h = img.size
    resized_w = min(WIDTH, math.ceil(HEIGHT * w / h))
    a = np.asarray(img.resize((resized_w, HEIGHT), Image.BILINEAR), dtype=np.float32)
    out = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    out[:, :, :resized_w] = (a.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def make_data(cache: Path, chars: list[str], seed: int = SEED) -> dict[str, np.ndarray]:
    """Eval (images, labels, words) and calib (images) sets; the calib words are other words."""
    index = {c: i + 1 for i, c in enumerate(chars)}
    chosen = words(cache, chars, EVAL + CALIB, seed)
    font_files = fonts(cache)
    rng = np.random.default_rng(seed + 1)
    x = np.stack([preprocess(render(w, font_files[i % len(font_files)], rng)) for i, w in enumerate(chosen)])
    ev = chosen[:EVAL]
    y = np.full((EVAL, max(len(w) for w in ev)), -1, dtype=np.int64)
    for i, w in enumerate(ev):
        y[i, :len(w)] = [index[c] for c in w]
    return {"x": x[:EVAL], "y": y, "words": np.array(ev, dtype=str), "calib_x": x[EVAL:]}


# -- metric (pure numpy) ----------------------------------------------------------------------
def ctc_greedy(probs: np.ndarray, blank: int = 0) -> list[np.ndarray]:
    """Best path per sample of [N, T, C] scores: argmax per step, repeats collapsed, blanks dropped."""
    best = np.asarray(probs).argmax(axis=-1)
    out = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != blank
        out.append(row[keep])
    return out


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance between two integer sequences."""
    prev = np.arange(len(b) + 1)
    for i in range(1, len(a) + 1):
        cur = np.empty_like(prev)
        cur[0] = i
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        prev = cur
    return int(prev[-1])


def ocr_scores(probs: np.ndarray, y: np.ndarray, blank: int = 0) -> tuple[float, float]:
    """(exact-match word accuracy, mean character accuracy) of CTC outputs against -1-padded labels.

    Character accuracy of a word is ``max(0, 1 - edit_distance / label_length)``.
    """
    decoded = ctc_greedy(probs, blank)
    exact = chars = 0.0
    for d, row in zip(decoded, np.asarray(y), strict=True):
        label = row[row >= 0]
        exact += float(len(d) == len(label) and bool(np.all(d == label)))
        chars += max(0.0, 1.0 - edit_distance(d, label) / max(1, len(label)))
    n = max(1, len(decoded))
    return exact / n, chars / n


# -- running ----------------------------------------------------------------------------------
def session(model: onnx.ModelProto | Path, threads: int = 0) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def predict(model: onnx.ModelProto | Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    s = session(model)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def latency_ms(model: onnx.ModelProto | Path, x: np.ndarray, runs: int = 30) -> float:
    """Median batch-1 latency, onnxruntime with one intra-op thread."""
    from loom.profiling.measure import time_call

    s = session(model, threads=1)
    feed = {s.get_inputs()[0].name: x[:1]}
    return time_call(lambda: s.run(None, feed), warmup=3, repeats=runs).median_ms


# -- structured pruning -----------------------------------------------------------------------
#: ops that act on each channel (last axis for MatMul regions, axis 1 for Conv ones) alone
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sigmoid", "Clip", "Relu", "HardSigmoid", "HardSwish",
               "Tanh", "Erf", "BatchNormalization", "Identity"}
CHANNEL_POOLS = {"GlobalAveragePool", "AveragePool", "MaxPool"}


def _attr(node: onnx.NodeProto, name: str, default: int = 1) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(onnx.helper.get_attribute_value(a))
    return default


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.g = model.graph
        self.inits = {t.name: numpy_helper.to_array(t) for t in self.g.initializer}
        self.readers: dict[str, list[int]] = {}
        self.writer: dict[str, int] = {}
        for i, n in enumerate(self.g.node):
            for x in n.input:
                self.readers.setdefault(x, []).append(i)
            for o in n.output:
                self.writer[o] = i
        self.outputs = {o.name for o in self.g.output}

    def weight(self, i: int) -> np.ndarray | None:
        n = self.g.node[i]
        return self.inits.get(n.input[1]) if len(n.input) > 1 else None

    def small(self, x: str, channels: int) -> bool:
        """A scalar, or a constant holding one value per channel."""
        v = self.inits.get(x)
        return v is not None and (v.size == 1 or (v.size == channels and max(v.shape) == channels))


def _region(gr: _Graph, p: int, kind: str) -> dict | None:
    """What removing output channels of weighted node ``p`` touches, or None if not internal.

    ``kind`` "matmul": MatMul [d, h] -> elementwise ops (bias add, activation) -> MatMul [h, d'].
    ``kind`` "conv": Conv (group 1) -> elementwise ops, depthwise Convs, squeeze-excite
    branches (pool -> Conv -> Relu -> Conv -> HardSigmoid, multiplied back) -> Conv sinks.
    """
    w = gr.weight(p)
    channels = w.shape[1] if kind == "matmul" else w.shape[0]
    region: list[int] = []   # elementwise / depthwise / pool nodes in the pruned channel space
    sinks: list[int] = []    # weighted readers: slice their input axis
    feeders: list[int] = []  # SE expand convs writing into the region: slice their output axis
    tensors = {gr.g.node[p].output[0]}
    frontier = [gr.g.node[p].output[0]]
    while frontier:
        t = frontier.pop()
        if t in gr.outputs:
            return None
        for c in gr.readers.get(t, []):
            if c in region or c in sinks:
                continue
            n = gr.g.node[c]
            wc = gr.weight(c) if n.op_type in ("MatMul", "Conv") else None
            if kind == "matmul" and n.op_type == "MatMul" and n.input[0] == t and wc is not None:
                if wc.ndim != 2 or wc.shape[0] != channels:
                    return None
                sinks.append(c)
                continue
            if kind == "conv" and n.op_type == "Conv" and n.input[0] == t and wc is not None:
                group = _attr(n, "group")
                if group == channels and wc.shape[0] == channels and wc.shape[1] == 1:
                    region.append(c)  # depthwise: its channels are ours
                    tensors.add(n.output[0])
                    frontier.append(n.output[0])
                elif group == 1 and wc.shape[1] == channels:
                    sinks.append(c)
                else:
                    return None
                continue
            if n.op_type in ELEMENTWISE or (kind == "conv" and n.op_type in CHANNEL_POOLS):
                region.append(c)
                tensors.add(n.output[0])
                frontier.append(n.output[0])
                continue
            return None
    # every other input of a region node: a region tensor, a small constant, or an SE gate
    for c in region:
        n = gr.g.node[c]
        for j, x in enumerate(n.input):
            if not x or x in tensors or (n.op_type == "Conv" and j > 0):
                continue
            if n.op_type == "BatchNormalization" and x in gr.inits:
                continue
            if gr.small(x, channels):
                continue
            feeder = _se_feeder(gr, x, channels, sinks) if kind == "conv" else None
            if feeder is None:
                return None
            feeders.append(feeder)
    if not sinks:
        return None
    return {"producer": p, "channels": channels, "region": region, "sinks": sinks, "feeders": feeders}


def _se_feeder(gr: _Graph, x: str, channels: int, sinks: list[int]) -> int | None:
    """The expand Conv of a squeeze-excite gate ``x`` whose squeeze Conv is one of ``sinks``."""
    i = gr.writer.get(x)
    while i is not None and gr.g.node[i].op_type in ("HardSigmoid", "Sigmoid"):
        i = gr.writer.get(gr.g.node[i].input[0])
    if i is None or gr.g.node[i].op_type != "Conv" or _attr(gr.g.node[i], "group") != 1:
        return None
    w = gr.weight(i)
    if w is None or w.shape[0] != channels:
        return None
    j = gr.writer.get(gr.g.node[i].input[0])  # the gate's inner activation, then the squeeze conv
    while j is not None and gr.g.node[j].op_type in ("Relu", "HardSwish", "Sigmoid", "Mul"):
        j = gr.writer.get(gr.g.node[j].input[0])
    return i if j in sinks else None


def structured_groups(model: onnx.ModelProto) -> list[dict]:
    """Every prunable group: SVTR MLP hidden layers and the backbone's conv channel groups."""
    gr = _Graph(model)
    groups = []
    for i, n in enumerate(gr.g.node):
        w = gr.weight(i) if n.op_type in ("MatMul", "Conv") else None
        if w is None:
            continue
        if n.op_type == "MatMul" and w.ndim == 2 and w.shape[1] > w.shape[0]:
            found = _region(gr, i, "matmul")  # an expanding MatMul: an MLP's first layer
        elif n.op_type == "Conv" and _attr(n, "group") == 1 and w.shape[0] > 1:
            found = _region(gr, i, "conv")
        else:
            found = None
        if found is not None:
            groups.append(found)
    return groups


def _score_std(gr: _Graph, group: dict, means: dict[str, np.ndarray]) -> np.ndarray:
    """Per-channel error of dropping it after mean compensation: input std x sink weight L2."""
    prod = gr.g.node[group["producer"]]
    total = np.zeros(group["channels"])
    for s in group["sinks"]:
        n = gr.g.node[s]
        mean, square = means[n.input[0]]
        std = np.sqrt(np.maximum(square - mean.astype(np.float64) ** 2, 0.0))
        ws = gr.inits[n.input[1]]
        ws = np.moveaxis(ws, 0 if prod.op_type == "MatMul" else 1, 0).reshape(group["channels"], -1)
        total += (std * np.sqrt((ws.astype(np.float64) ** 2).sum(1))) ** 2
    return total


def _score(gr: _Graph, group: dict) -> np.ndarray:
    """Per-channel importance: L1 of its producer weights (+ |bias|) x L1 of its sink weights."""
    prod = gr.g.node[group["producer"]]
    w = gr.inits[prod.input[1]]
    w = w.T if prod.op_type == "MatMul" else w.reshape(w.shape[0], -1)
    out_l1 = np.abs(w).sum(axis=1)
    if len(prod.input) > 2 and prod.input[2]:
        out_l1 = out_l1 + np.abs(gr.inits[prod.input[2]])
    elif prod.op_type == "MatMul":  # a MatMul's bias is the Add right after it
        for c in gr.readers.get(prod.output[0], []):
            n = gr.g.node[c]
            other = [x for x in n.input if x != prod.output[0]]
            if n.op_type == "Add" and other and gr.small(other[0], group["channels"]):
                out_l1 = out_l1 + np.abs(gr.inits[other[0]].reshape(-1))
    in_l1 = np.zeros(group["channels"])
    for s in group["sinks"]:
        ws = gr.inits[gr.g.node[s].input[1]]
        in_l1 += np.abs(np.moveaxis(ws, 0 if prod.op_type == "MatMul" else 1, 0)).reshape(group["channels"], -1).sum(1)
    return out_l1 * in_l1


def sink_means(model: onnx.ModelProto, x: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    """Per-channel [mean, mean square] of every structured group's sink input over images ``x``."""
    gr = _Graph(model)
    tensors: dict[str, str] = {}
    for gp in structured_groups(model):
        for s in gp["sinks"]:
            n = gr.g.node[s]
            tensors[n.input[0]] = n.op_type
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for t in tensors:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    s = session(probe)
    names = list(tensors)
    sums: dict[str, np.ndarray] = {}
    for i in range(0, len(x), batch):
        outs = s.run(names, {s.get_inputs()[0].name: x[i:i + batch]})
        for t, v in zip(names, outs, strict=True):
            axes = (0, 2, 3) if tensors[t] == "Conv" else tuple(range(v.ndim - 1))
            v64 = v.astype(np.float64)  # equal positions per image: batch means add up
            part = np.stack([v64.mean(axis=axes), (v64 ** 2).mean(axis=axes)]) * len(v)
            sums[t] = sums[t] + part if t in sums else part
    return {t: (sums[t] / len(x)).astype(np.float32) for t in names}


def _compensate(gr: _Graph, sink: int, dropped: np.ndarray, mean: np.ndarray, tag: str) -> None:
    """Fold the dropped channels' mean input into the sink's bias (Conv bias or the Add after a MatMul)."""
    n = gr.g.node[sink]
    w = gr.inits[n.input[1]]
    if n.op_type == "MatMul":
        shift = mean[dropped] @ w[dropped, :]
        adds = [c for c in gr.readers.get(n.output[0], []) if gr.g.node[c].op_type == "Add"]
        for c in adds:
            a = gr.g.node[c]
            j = next((j for j, x in enumerate(a.input) if x != n.output[0] and gr.small(x, w.shape[1])), None)
            if j is not None:
                name = f"{a.input[j]}__{tag}"
                gr.inits[name] = gr.inits[a.input[j]] + shift.reshape(gr.inits[a.input[j]].shape)
                a.input[j] = name
                return
        raise ValueError(f"{n.name}: no bias Add to compensate into")
    shift = np.einsum("ochw,c->o", w[:, dropped], mean[dropped])
    bias = gr.inits[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros(w.shape[0], np.float32)
    name = f"{n.input[1]}__bias_{tag}"
    gr.inits[name] = (bias + shift).astype(np.float32)
    if len(n.input) > 2:
        n.input[2] = name
    else:
        n.input.append(name)


def prune_structured(model: onnx.ModelProto, share: float, *, mlp: bool = True, convs: bool = True,
                     means: dict[str, np.ndarray] | None = None,
                     keep_whole: Iterable[str] = ()) -> tuple[onnx.ModelProto, dict]:
    """Remove the lowest-scoring ``share`` of channels of every group, slicing the initializers.

    Groups: the hidden neurons of each SVTR MLP (MatMul [d, h] -> bias -> swish -> MatMul
    [h, d]) with ``mlp``; with ``convs``, the output channels of each group-1 Conv whose
    channels flow only through per-channel ops (scalar affine, hardswish, BatchNorm,
    depthwise Convs, squeeze-excite gates) into other Convs. Blocks' outputs that feed
    residual adds, concats or reshapes stay whole, so every cut tensor keeps its shape.

    Without ``means`` channels are ranked by weight L1 alone (producer x consumer). With
    ``means`` (``sink_means`` of the dense model on calibration images) they are ranked by
    the error dropping them leaves (the input's std x the consumer's weight L2) and each
    dropped channel's mean input is folded into the consumer's bias: a closed-form
    correction, no training. On this network weight-L1 ranking alone collapses the model
    (10%: exact match 1%) because many low-L1 channels carry large constant offsets.
    ``keep_whole``: tensors whose group is left whole (the cuts sparseloom stitches at: the
    backbone has no residual adds, so its block outputs are the only cut points, and a
    thinned one would exist at another width in this variant).
    Returns the model and a report (groups, channels removed).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    gr = _Graph(out)
    whole = set(keep_whole)
    groups = [gp for gp in structured_groups(out)
              if ((mlp and gr.g.node[gp["producer"]].op_type == "MatMul")
                  or (convs and gr.g.node[gp["producer"]].op_type == "Conv"))
              and not whole & {o for i in [gp["producer"], *gp["region"]] for o in gr.g.node[i].output}]
    original = {t.name for t in gr.g.initializer}
    removed = {"mlp_neurons": 0, "conv_channels": 0, "groups": len(groups)}

    def slice_input(node: onnx.NodeProto, j: int, keep: np.ndarray, axis: int, tag: str) -> None:
        name = node.input[j]
        value = np.take(gr.inits[name], keep, axis=axis)
        renamed = f"{name}__{tag}"
        gr.inits[renamed] = value  # a sink may be the next group's producer
        node.input[j] = renamed

    for k, gp in enumerate(groups):
        c = gp["channels"]
        keep_n = max(1, int(round(c * (1 - share))))
        if keep_n == c:
            continue
        score = _score(gr, gp) if means is None else _score_std(gr, gp, means)
        keep = np.sort(np.argsort(-score, kind="stable")[:keep_n])
        prod = gr.g.node[gp["producer"]]
        is_mm = prod.op_type == "MatMul"
        removed["mlp_neurons" if is_mm else "conv_channels"] += c - keep_n
        slice_input(prod, 1, keep, 1 if is_mm else 0, f"out{k}")
        if len(prod.input) > 2 and prod.input[2]:
            slice_input(prod, 2, keep, 0, f"out{k}")
        for r in gp["region"]:
            n = gr.g.node[r]
            if n.op_type == "Conv":  # depthwise
                slice_input(n, 1, keep, 0, f"dw{k}")
                if len(n.input) > 2 and n.input[2]:
                    slice_input(n, 2, keep, 0, f"dw{k}")
                for a in n.attribute:
                    if a.name == "group":
                        a.i = keep_n
                continue
            for j, x in enumerate(n.input):
                v = gr.inits.get(x)
                if v is not None and v.size == c:
                    axis = int(np.argmax(v.shape))
                    slice_input(n, j, keep, axis, f"ch{k}")
        dropped = np.setdiff1d(np.arange(c), keep)
        for s in gp["sinks"]:
            if means is not None:  # before slicing: the sink's weights still have every channel
                _compensate(gr, s, dropped, means[gr.g.node[s].input[0]][0], f"comp{k}")
            slice_input(gr.g.node[s], 1, keep, 0 if is_mm else 1, f"in{k}")
        for f in gp["feeders"]:
            n = gr.g.node[f]
            slice_input(n, 1, keep, 0, f"se{k}")
            if len(n.input) > 2 and n.input[2]:
                slice_input(n, 2, keep, 0, f"se{k}")
    read = {x for n in gr.g.node for x in n.input}
    kept = [t for t in gr.g.initializer if t.name in read]
    del gr.g.initializer[:]
    gr.g.initializer.extend(kept)
    gr.g.initializer.extend(numpy_helper.from_array(v, k) for k, v in gr.inits.items()
                            if k in read and k not in original)
    del gr.g.value_info[:]
    onnx.checker.check_model(out)
    return out, removed


def cut_anchors(model: onnx.ModelProto, shares: Sequence[float] = (1 / 3, 2 / 3)) -> list[str]:
    """The one-tensor cuts nearest each share of the MACs: the block outputs structured
    pruning leaves whole, so that every variant can be cut there."""
    from loom.model.cuts import GraphIndex, candidate_cuts

    single = [c for c in candidate_cuts(GraphIndex.build(model), max_tensors=1) if len(c.tensors) == 1]
    return [min(single, key=lambda c: abs(c.macs_before - share)).tensors[0] for share in shares]


def parameters(model: onnx.ModelProto) -> int:
    """Weights of the Conv and MatMul nodes (their initializers' elements)."""
    inits = {t.name: t for t in model.graph.initializer}
    return sum(int(np.prod(inits[x].dims)) for n in model.graph.node if n.op_type in ("Conv", "MatMul")
               for x in n.input[1:] if x in inits)


def macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of the Conv and MatMul nodes at batch 1 (shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul"):
            continue
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        o = shapes.get(n.output[0])
        if not o:
            continue
        if n.op_type == "Conv" and w is not None:
            total += int(np.prod(o)) * int(np.prod(w[1:]))
        elif n.op_type == "MatMul":
            a = shapes.get(n.input[0])
            total += int(np.prod(o)) * (a[-1] if a else 0)
    return total


# -- the stage --------------------------------------------------------------------------------
def build(raw: Path, cache: Path, log: Log = print) -> dict:
    """Write the dense model, its variants, ``eval.npz``, ``calib.npz`` and ``charset.txt`` to ``raw``."""
    from loom.model.variants import prune_unstructured, weight_sparsity

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    shipped = onnx.load(str(model_file(cache)))
    chars = charset(shipped)
    dense = prepare(shipped)
    timings["sources_s"] = round(time.perf_counter() - t0, 1)

    t1 = time.perf_counter()
    data = make_data(cache, chars)
    timings["data_s"] = round(time.perf_counter() - t1, 1)
    raw.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(raw / "eval.npz", x=data["x"], y=data["y"], words=data["words"])
    np.savez_compressed(raw / "calib.npz", x=data["calib_x"])
    (raw / "charset.txt").write_text("\n".join(chars) + "\n", encoding="utf-8")

    t2 = time.perf_counter()
    made: dict[str, dict] = {}
    base_note = ("PaddleOCR PP-OCRv4 recognition (ch_PP-OCRv4_rec_infer.onnx from the PyPI wheel "
                 f"{MODEL_PACKAGE[0]} {MODEL_PACKAGE[1]}) as shipped, weights moved from Constant nodes "
                 f"to initializers and the input fixed to [batch, 3, {HEIGHT}, {WIDTH}]")
    dense_params, dense_macs = parameters(dense), macs(dense)
    candidates: list[tuple[str, onnx.ModelProto, str, float, str]] = [
        ("dense", dense, "dense", 0.0, base_note)]
    kept = [n.input[1] for n in dense.graph.node if n.op_type == "Conv" and _attr(n, "group") > 1]
    kept += [x for x in SENSITIVE if x in {t.name for t in dense.graph.initializer}]
    for s in UNSTRUCTURED:
        m = prune_unstructured(dense, s, exclude=kept)
        got = weight_sparsity(m)
        candidates.append((f"unstructured-{round(s * 100)}", m, "unstructured", round(got, 4),
                           f"per-tensor magnitude pruning to {s:.0%} zeros of every Conv/MatMul weight with >= 256 "
                           f"elements (loom prune_unstructured) except the {len(kept) - len(SENSITIVE)} depthwise "
                           f"convs and 3 sensitive pointwise convs ({', '.join(SENSITIVE)}), kept dense: "
                           f"{got:.2%} of all those weights zero; no fine-tuning"))
    means = sink_means(dense, data["calib_x"])
    anchors = cut_anchors(dense)
    for s in STRUCTURED:
        m, rep = prune_structured(dense, s, means=means, keep_whole=anchors)
        p, mc = parameters(m), macs(m)
        if p >= dense_params or mc >= dense_macs:
            raise RuntimeError(f"structured-{s}: nothing removed ({rep})")
        candidates.append((f"structured-{round(s * 100)}", m, "structured", round(1 - p / dense_params, 4),
                           f"{s:.0%} of the hidden neurons of both SVTR MLPs and {s:.0%} of the output channels of "
                           f"every internal Conv group (pointwise -> depthwise -> pointwise incl. squeeze-excite, "
                           f"neck convs) sliced out of the ONNX initializers ({rep['mlp_neurons']} neurons + "
                           f"{rep['conv_channels']} channels in {rep['groups']} groups; Conv/MatMul parameters "
                           f"{dense_params} -> {p}, MACs {dense_macs / 1e6:.0f}M -> {mc / 1e6:.0f}M), ranked by "
                           f"activation std x consumer weight L2 on the {CALIB} calibration images, each dropped "
                           "channel's mean folded into the consumer's bias; the groups of the block outputs "
                           f"{anchors} (the cuts at a third and two thirds of the MACs) left whole; no fine-tuning"))
    for name, m, kind, sparsity, note in candidates:
        path = raw / f"{name}.onnx"
        onnx.save(m, str(path))
        acc, char_acc = ocr_scores(predict(path, data["x"]), data["y"])
        made[name] = {"kind": kind, "sparsity": sparsity, "made_by": note, "fine_tuned": "no",
                      "accuracy": round(acc, 4), "char_accuracy": round(char_acc, 4),
                      "parameters": parameters(m), "macs": macs(m)}
        log(f"  {name}: exact {acc:.3f}, char {char_acc:.3f}, params {made[name]['parameters']}, "
            f"MACs {made[name]['macs'] / 1e6:.0f}M")
    timings["variants_s"] = round(time.perf_counter() - t2, 1)
    t3 = time.perf_counter()
    timings["dense_latency_ms_b1_1thread"] = round(latency_ms(raw / "dense.onnx", data["x"]), 2)
    batch16 = session(raw / "dense.onnx").run(None, {"x": data["x"][:16]})[0]
    timings["batch16_output_shape"] = list(batch16.shape)  # type: ignore[assignment]
    timings["latency_s"] = round(time.perf_counter() - t3, 1)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    made["timings"] = timings
    return made


def summary(raw: Path, cache: Path, result: dict) -> dict:
    """The stage's result with the sources' sizes and licences."""
    wheel = edge_sources.wheel(*MODEL_PACKAGE[:2], cache)
    sizes = {wheel.name: wheel.stat().st_size}
    for deb in DEBS:
        sizes.update({p.name: p.stat().st_size for p in (cache / "debs" / deb).glob("*.deb")})
    files = {p.name: p.stat().st_size for p in sorted(raw.iterdir())}
    return {**result, "downloads_bytes": sizes, "licences": licences(cache), "files_bytes": files}


if __name__ == "__main__":
    raw, cache = REPO / "out" / "edge-raw" / "ocr", REPO / "out" / "cache" / "edge"
    result = build(raw, cache, lambda m: print(m, flush=True))
    print(json.dumps(summary(raw, cache, result), indent=1))
