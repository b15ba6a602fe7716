"""Latency of a plan: its blocks on their processors plus the hand-offs between them.

``LinkModel`` prices a hand-off between two processors (fixed ms + bytes / bandwidth,
plus a dispatch cost per request); ``latency_table`` predicts every (block, processor)
pair once, and ``plan_latency``/``predict_plan`` sum a plan from them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from estimators.features import latency_row
from estimators.latency import LatencyEstimator, nnls
from loom.core.errors import ConfigError


# -- links between processors -------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """A hand-off's cost: a fixed latency plus bytes over a bandwidth (GB/s = 1e9 bytes/s)."""

    latency_ms: float
    bandwidth_gbps: float

    def transfer_ms(self, nbytes: float) -> float:
        return self.latency_ms + float(nbytes) / (self.bandwidth_gbps * 1e9) * 1e3


@dataclass
class LinkModel:
    """Transfer cost between processors: per ordered pair, fixed ms + bytes / bandwidth.

    The SparseLoom paper ignores transfers; on an SoC where the NPU sits behind a
    slower bus they decide whether splitting a model pays. Pairs not listed use
    ``default`` (or raise, naming the pair, when there is none); a processor to
    itself is free. ``symmetric`` links serve both directions. ``dispatch_ms`` is a
    fixed cost per request on the processor that runs its first slot (handing the
    request to a worker and back), which block latencies measured one block at a
    time do not contain; ``loom profile`` calibrates it (``from_calibration``).
    """

    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    default: Link | None = None
    symmetric: bool = True
    dispatch_ms: dict[str, float] = field(default_factory=dict)

    def link(self, src: str, dst: str) -> Link | None:
        if src == dst:
            return None
        found = self.links.get((src, dst))
        if found is None and self.symmetric:
            found = self.links.get((dst, src))
        if found is None:
            found = self.default
        if found is None:
            raise ConfigError(f"no link between processors {src!r} and {dst!r} and no default link")
        return found

    def transfer_ms(self, src: str, dst: str, nbytes: float) -> float:
        link = self.link(src, dst)
        return 0.0 if link is None else link.transfer_ms(nbytes)

    @classmethod
    def from_profile(cls, profile: Any) -> LinkModel:
        """From a device profile's links (objects or dicts with ``between``, ``bandwidth_gbps``, ``latency_us``)."""
        links: dict[tuple[str, str], Link] = {}
        for entry in getattr(profile, "links", None) or (profile.get("links", []) if isinstance(profile, Mapping) else []):
            get = entry.get if isinstance(entry, Mapping) else (lambda k, e=entry: getattr(e, k))
            a, b = get("between")
            links[(a, b)] = Link(latency_ms=float(get("latency_us")) / 1e3, bandwidth_gbps=float(get("bandwidth_gbps")))
        return cls(links=links, symmetric=True)

    @classmethod
    def from_calibration(cls, calibration: Mapping[str, Any]) -> LinkModel:
        """From ``loom profile``'s link calibration (``meta.json``'s ``link_calibration``).

        Reads ``links.*.{between, latency_us, bandwidth_gbps}`` and
        ``processors.*.dispatch_us``; a link without a measurable per-byte cost has an
        infinite bandwidth.
        """
        links: dict[tuple[str, str], Link] = {}
        for entry in (calibration.get("links") or {}).values():
            a, b = entry["between"]
            bw = entry.get("bandwidth_gbps")
            links[(a, b)] = Link(latency_ms=float(entry.get("latency_us") or 0.0) / 1e3,
                                 bandwidth_gbps=float(bw) if bw else math.inf)
        dispatch = {name: float(p.get("dispatch_us") or 0.0) / 1e3
                    for name, p in (calibration.get("processors") or {}).items()}
        return cls(links=links, symmetric=True, dispatch_ms=dispatch)

    @classmethod
    def fit(cls, samples: Iterable[tuple[str, str, float, float]], *, symmetric: bool = True) -> LinkModel:
        """Fit each pair from measured hand-offs ``(src, dst, nbytes, ms)``: least squares, non-negative.

        A pair measured at one size only gets its mean as fixed cost and infinite bandwidth.
        """
        by_pair: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for src, dst, nbytes, ms in samples:
            key = tuple(sorted((src, dst))) if symmetric else (src, dst)
            by_pair.setdefault(key, []).append((float(nbytes), float(ms)))  # type: ignore[arg-type]
        links = {}
        for key, pts in by_pair.items():
            arr = np.array(pts)
            design = np.column_stack([np.ones(len(arr)), arr[:, 0]])
            if len(np.unique(arr[:, 0])) < 2:
                links[key] = Link(latency_ms=float(arr[:, 1].mean()), bandwidth_gbps=math.inf)
                continue
            fixed, per_byte = nnls(design, arr[:, 1])
            bw = math.inf if per_byte <= 0 else 1e-6 / per_byte  # ms/byte -> GB/s
            links[key] = Link(latency_ms=float(fixed), bandwidth_gbps=float(bw))
        return cls(links=links, symmetric=symmetric)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        def enc(link: Link) -> dict[str, float | str]:
            bw: float | str = link.bandwidth_gbps if math.isfinite(link.bandwidth_gbps) else "inf"
            return {"latency_ms": link.latency_ms, "bandwidth_gbps": bw}

        return {
            "symmetric": self.symmetric,
            "default": enc(self.default) if self.default else None,
            "links": [{"between": list(k), **enc(v)} for k, v in self.links.items()],
            "dispatch_ms": dict(self.dispatch_ms),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinkModel:
        def dec(d: Mapping[str, Any]) -> Link:
            return Link(latency_ms=float(d["latency_ms"]), bandwidth_gbps=float(d["bandwidth_gbps"]))

        return cls(
            links={tuple(d["between"]): dec(d) for d in data.get("links", [])},  # type: ignore[misc]
            default=dec(data["default"]) if data.get("default") else None,
            symmetric=bool(data.get("symmetric", True)),
            dispatch_ms={k: float(v) for k, v in (data.get("dispatch_ms") or {}).items()},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


# -- plans ------------------------------------------------------------------------------------------
@dataclass
class PlanLatency:
    """A plan's predicted latency and where it goes."""

    total_ms: float
    block_ms: list[float]
    #: hand-off after slot s (0 where slots s and s+1 share a processor)
    transfer_ms: list[float]
    #: the first processor's fixed cost per request (0 without a link model)
    dispatch_ms: float = 0.0


def latency_table(
    estimator: LatencyEstimator,
    blocks: Mapping[str, Mapping[str, float]],
    processors: Mapping[str, Mapping[str, float]],
) -> dict[tuple[str, str], float]:
    """Predicted ms of every block on every processor, in one batched prediction.

    The optimizer looks up thousands of plans; they share a few dozen blocks, so
    predicting each (block, processor) pair once and summing is what makes it cheap.
    """
    keys = [(b, p) for b in blocks for p in processors]
    if not keys:
        return {}
    rows = [latency_row(blocks[b], processors[p]) for b, p in keys]
    return dict(zip(keys, (float(v) for v in estimator.predict(rows)), strict=True))


def plan_latency(
    block_ids: Sequence[str],
    processors: Sequence[str],
    table: Mapping[tuple[str, str], float],
    out_bytes: Mapping[str, float],
    link_model: LinkModel | None = None,
) -> PlanLatency:
    """Sum of block latencies plus hand-offs between consecutive slots on different processors.

    The bytes handed from slot s to s+1 are block s's output activations
    (``act_out_bytes``); tensors the next block reads straight from the request (a
    transformer's mask) are not counted. The link model's ``dispatch_ms`` of the first
    processor is added once.
    """
    if len(block_ids) != len(processors):
        raise ValueError(f"{len(block_ids)} blocks but {len(processors)} processors: one processor per slot")
    block_ms = [table[(b, p)] for b, p in zip(block_ids, processors, strict=True)]
    transfers = []
    for s in range(len(block_ids) - 1):
        src, dst = processors[s], processors[s + 1]
        if src == dst:
            transfers.append(0.0)
            continue
        if link_model is None:
            raise ConfigError(f"slots {s} and {s + 1} run on {src!r} and {dst!r}: a link model is needed")
        transfers.append(link_model.transfer_ms(src, dst, out_bytes[block_ids[s]]))
    dispatch = link_model.dispatch_ms.get(processors[0], 0.0) if link_model is not None and processors else 0.0
    total = float(sum(block_ms) + sum(transfers) + dispatch)
    return PlanLatency(total_ms=total, block_ms=block_ms, transfer_ms=transfers, dispatch_ms=dispatch)


def predict_plan(
    estimator: LatencyEstimator,
    block_rows: Sequence[Mapping[str, float]],
    processors: Sequence[str],
    processor_rows: Mapping[str, Mapping[str, float]],
    link_model: LinkModel | None = None,
) -> PlanLatency:
    """Latency of one plan: ``block_rows[s]`` (``block_features``) runs on ``processors[s]``.

    ``processor_rows`` maps each processor name to its ``processor_features``. Nothing
    here needs the block or the task to have been measured.
    """
    ids = [str(i) for i in range(len(block_rows))]
    blocks = dict(zip(ids, block_rows, strict=True))
    table = latency_table(estimator, blocks, {p: processor_rows[p] for p in dict.fromkeys(processors)})
    out_bytes = {i: float(row["act_out_bytes"]) for i, row in blocks.items()}
    return plan_latency(ids, processors, table, out_bytes, link_model)


__all__ = ["Link", "LinkModel", "PlanLatency", "latency_table", "plan_latency", "predict_plan"]
