"""MobileNetV2 in plain torch, loading torchvision's ImageNet checkpoint, for the edge zoo.

torchvision itself is not installed (its PyPI build pairs with CUDA torch), so the
network is written out here with torchvision's module names, which makes
``load_state_dict`` take the official ``mobilenet_v2-b0353104.pth`` as it is. The
model takes Fashion-MNIST as it comes (N x 1 x 28 x 28 in [0, 1]): resizing, the grey
to RGB copy and ImageNet's normalization are part of the exported graph. ``hidden``
overrides each inverted-residual block's expansion width: the structured variants are
the same network with fewer hidden channels, chosen by ``thin``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

# (expansion t, output channels c, repeats n, first stride s): torchvision's table
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Sequential):
    """Conv + BatchNorm + ReLU6, named as torchvision names them (0, 1, 2)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1), with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, hidden: int, expand: bool) -> None:
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU(cin, hidden, k=1)] if expand else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


def default_hidden() -> list[int]:
    """The expansion width of each of the 17 inverted-residual blocks in torchvision's net."""
    widths, cin = [], 32
    for t, c, n, _ in SETTINGS:
        for _ in range(n):
            widths.append(cin * t)
            cin = c
    return widths


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 features + a linear head over the pooled 1280 features."""

    def __init__(self, num_classes: int, side: int, hidden: list[int] | None = None) -> None:
        super().__init__()
        self.side = side
        hidden = hidden or default_hidden()
        feats: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        cin, i = 32, 0
        for t, c, n, s in SETTINGS:
            for j in range(n):
                feats.append(InvertedResidual(cin, c, s if j == 0 else 1, hidden[i], expand=t != 1))
                cin, i = c, i + 1
        feats.append(ConvBNReLU(cin, 1280, k=1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """N x 1 x 28 x 28 grey in [0, 1] -> N x 3 x side x side, ImageNet-normalized."""
        x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False)
        return (torch.cat([x, x, x], dim=1) - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.prepare(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def load_imagenet(path: str, num_classes: int, side: int) -> MobileNetV2:
    """The ImageNet-trained backbone from torchvision's checkpoint, with a fresh head."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    model = MobileNetV2(num_classes, side)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(("classifier.", "mean", "std"))]
    if bad or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match MobileNetV2 (missing {bad[:3]}, extra {unexpected[:3]})")
    return model.eval()


def blocks(model: MobileNetV2) -> list[InvertedResidual]:
    return [m for m in model.features if isinstance(m, InvertedResidual)]


def thin(model: MobileNetV2, fraction: float) -> MobileNetV2:
    """Copy of ``model`` keeping ``1 - fraction`` of each expanding block's hidden channels
    (rounded to a multiple of 8).

    Channels are ranked by the product of the expansion filter's L1 norm and the absolute
    BatchNorm scale after it (a channel the network scales to nothing carries nothing),
    and the expansion conv, its BN, the depthwise conv, its BN and the projection's input
    columns are cut to the kept set: a genuinely smaller network, not a masked one.
    """
    hidden, keep = [], []
    for b in blocks(model):
        layers = list(b.conv)
        if len(layers) == 3:  # the first block does not expand: nothing to cut
            hidden.append(layers[0][0].out_channels)
            keep.append(None)
            continue
        expand = layers[0]
        score = expand[0].weight.detach().abs().sum(dim=(1, 2, 3)) * expand[1].weight.detach().abs()
        # a multiple of 8: onnxruntime's and OpenVINO's blocked conv layouts run 115
        # channels slower than 144 (measured: structured-20 at 10.6 ms against dense 6.0)
        n = max(8, 8 * round(score.numel() * (1 - fraction) / 8))
        idx = torch.sort(torch.topk(score, n).indices).values
        hidden.append(n)
        keep.append(idx)
    out = MobileNetV2(model.classifier[1].out_features, model.side, hidden)
    out.load_state_dict(_thinned_state(model, keep))
    return out.eval()


def _thinned_state(model: MobileNetV2, keep: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    state = copy.deepcopy(model.state_dict())
    feature_index = [i for i, m in enumerate(model.features) if isinstance(m, InvertedResidual)]
    for fi, idx in zip(feature_index, keep, strict=True):
        if idx is None:
            continue
        p = f"features.{fi}.conv."
        for key in list(state):
            if not key.startswith(p) or key.endswith("num_batches_tracked"):
                continue
            part = key[len(p):]
            if part.startswith(("0.", "1.")):  # expand and depthwise: output channels
                state[key] = state[key][idx]
            elif part == "2.weight":  # projection: input channels
                state[key] = state[key][:, idx]
    return state
