"""The torch stage of the edge zoo: prune the pretrained backbone, re-estimate its BatchNorm
statistics, fit each task's linear head, export to ONNX.

The backbone's weights are never trained here (no labels reach them): pruning is by
magnitude, BatchNorm statistics are re-estimated from unlabelled training images, and
only the linear head over the pooled features learns from labels. Two tasks with the same
backbone variant therefore share every byte of it, which is what cross-task block sharing
needs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from edge_mobilenet import MobileNetV2
from torch import nn

OPSET = 17


def images(x: np.ndarray) -> torch.Tensor:
    """uint8 N x 28 x 28 -> float32 N x 1 x 28 x 28 in [0, 1], the models' input."""
    return torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)


def prunable_convs(model: MobileNetV2) -> list[nn.Conv2d]:
    """Every 1x1 conv (expansions, projections, the last 320->1280): where the weights are."""
    return [m for m in model.features.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]


def magnitude_prune(model: MobileNetV2, sparsity: float) -> float:
    """Zero the smallest ``sparsity`` share of each 1x1 conv's weights in place; return the
    share of zeros over those convs as achieved (the stem and depthwise convs stay dense)."""
    return prune_weights(prunable_convs(model), sparsity)


def prune_weights(layers: list[nn.Module], sparsity: float) -> float:
    """Zero the smallest ``sparsity`` share of each layer's weights in place (per layer);
    return the share of zeros over all of them as achieved."""
    zeros = total = 0
    with torch.no_grad():
        for layer in layers:
            w = layer.weight
            k = int(round(w.numel() * sparsity))
            if k:
                threshold = w.abs().flatten().kthvalue(k).values
                w[w.abs() <= threshold] = 0.0
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


@torch.no_grad()
def recalibrate_bn(model: MobileNetV2, x: torch.Tensor, batch: int = 64) -> None:
    """Re-estimate every BatchNorm's running mean and variance on ``x`` (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for i in range(0, len(x), batch):
        model.embed(x[i:i + batch])
    model.eval()


def embed(model: MobileNetV2, x: torch.Tensor, tmp: Path, *, batch: int = 100) -> torch.Tensor:
    """The pooled 1280 features of ``x``, computed by onnxruntime on the exported backbone
    (several times faster than torch's CPU depthwise convolutions)."""
    import onnxruntime as ort

    head = model.classifier
    model.classifier = nn.Identity()  # type: ignore[assignment]
    try:
        export_onnx(model, tmp)
    finally:
        model.classifier = head
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    arr = x.numpy()
    out = np.concatenate([sess.run(None, {"input": arr[i:i + batch]})[0] for i in range(0, len(arr), batch)])
    tmp.unlink()
    return torch.from_numpy(out)


def fit_head(feats: torch.Tensor, y: np.ndarray, classes: int, *, l2: float = 1e-3, steps: int = 200) -> nn.Linear:
    """Multinomial logistic regression on standardized features (L-BFGS), folded back into
    one ``Linear`` over the raw features."""
    torch.manual_seed(0)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mu) / sd
    target = torch.from_numpy(y.astype(np.int64))
    lin = nn.Linear(feats.shape[1], classes)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(z), target) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(feats.shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(lin.weight / sd)
        head.bias.copy_(lin.bias - (lin.weight * mu / sd).sum(1))
    return head


def accuracy(logits: torch.Tensor, y: np.ndarray) -> float:
    return float((logits.argmax(1).numpy() == y).mean())


def export_onnx(model: MobileNetV2, path: Path) -> None:
    """Export in eval mode with the legacy exporter (BatchNorm folded into the convs), batch
    axis dynamic, weights embedded; refuse a graph where BatchNormalization survived."""
    import onnx

    model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        torch.onnx.export(model, (torch.rand(1, 1, 28, 28),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)
    proto = onnx.load(str(path))
    if any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        raise RuntimeError(f"{path.name}: BatchNormalization survived the export")
    del proto.graph.value_info[:]
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
