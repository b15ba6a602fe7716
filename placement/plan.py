"""What the optimizer works on (``TaskSpace``) and what it hands the runtime (``Plan``).

``TaskSpace``: one task's choices as plain numbers (the block of each variant in each
slot, its latency on each processor, hand-off bytes, memory, links, config accuracy);
building one is ``loom.profiling.fitting``'s job. ``Plan``: a config (one variant per
slot) on a placement (one processor per slot), with its predicted figures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from estimators.plans import LinkModel

Config = tuple[str, ...]
Placement = tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    task: str
    config: Config
    placement: Placement
    block_ids: tuple[str, ...]
    #: predicted end-to-end ms: blocks + hand-offs + the first processor's dispatch cost
    latency_ms: float
    #: predicted ms of each slot's block on its processor
    block_ms: tuple[float, ...]
    #: predicted ms of the hand-off after each slot (0 where slot s and s+1 share a processor)
    transfer_ms: tuple[float, ...]
    #: predicted accuracy (0-1) of the config
    accuracy: float
    #: resident bytes of its distinct blocks on their processors
    memory_bytes: int

    @property
    def k(self) -> int:
        return len(self.config)

    def segments(self) -> list[tuple[str, list[int]]]:
        """Runs of consecutive slots on one processor: ``[(processor, [slots...]), ...]``."""
        out: list[tuple[str, list[int]]] = []
        for s, p in enumerate(self.placement):
            if out and out[-1][0] == p:
                out[-1][1].append(s)
            else:
                out.append((p, [s]))
        return out

    @property
    def dispatch_ms(self) -> float:
        """The first processor's fixed cost per request (what the latency holds beyond blocks and hand-offs)."""
        return max(0.0, self.latency_ms - sum(self.block_ms) - sum(self.transfer_ms))

    def processor_ms(self, *, overheads: bool = True) -> dict[str, float]:
        """Predicted busy time this plan puts on each processor, per request.

        Blocks, plus (``overheads``) the dispatch cost on the first processor and each
        hand-off's cost on the processor that receives it. Those are mostly work, not
        waiting: submitting, waking a worker, starting the engine. On a host whose
        processors are its CPU cores that work lands on them (measured here: ~0.25 ms
        per request, which at a few hundred requests per second is a large share of a
        core); counting it keeps capacity estimates and the load balance honest.
        """
        busy: dict[str, float] = {}
        for p, ms in zip(self.placement, self.block_ms, strict=True):
            busy[p] = busy.get(p, 0.0) + ms
        if overheads and self.placement:
            first = self.placement[0]
            busy[first] += self.dispatch_ms
            for s, ms in enumerate(self.transfer_ms):
                busy[self.placement[s + 1]] += ms
        return busy

    @property
    def is_uniform(self) -> bool:
        """An original variant (the same variant in every slot)."""
        return len(set(self.config)) == 1

    @property
    def on_one_processor(self) -> bool:
        return len(set(self.placement)) == 1


@dataclass
class TaskSpace:
    task: str
    variants: list[str]
    k: int
    processors: list[str]
    #: (variant, slot) -> block id
    blocks: dict[tuple[str, int], str]
    #: (block id, processor) -> ms; a missing pair means the processor cannot run the block
    block_ms: dict[tuple[str, str], float]
    #: block id -> bytes of activations it hands to the next slot
    out_bytes: dict[str, float]
    #: block id -> resident bytes when loaded (the same on every processor unless given per pair)
    memory_bytes: dict[str, int]
    #: accuracy (0-1) of a config: a mapping over configs, or a function of a list of configs
    accuracy: Mapping[Config, float] | Callable[[Sequence[Config]], Sequence[float]]
    link_model: LinkModel | None = None
    #: standalone accuracy of each variant (its uniform config), for the single-variant policies
    variant_accuracy: dict[str, float] = field(default_factory=dict)

    def block(self, variant: str, slot: int) -> str:
        return self.blocks[(variant, slot)]

    def accuracies(self, configs: Sequence[Config]) -> list[float]:
        if isinstance(self.accuracy, Mapping):
            return [float(self.accuracy[tuple(c)]) for c in configs]
        return [float(a) for a in self.accuracy(list(configs))]

    def can_run(self, block_id: str, processor: str) -> bool:
        return (block_id, processor) in self.block_ms

    def transfer_ms(self, src: str, dst: str, block_id: str) -> float:
        if src == dst:
            return 0.0
        if self.link_model is None:
            return 0.0
        return self.link_model.transfer_ms(src, dst, self.out_bytes.get(block_id, 0.0))

    def dispatch_ms(self, processor: str) -> float:
        return self.link_model.dispatch_ms.get(processor, 0.0) if self.link_model is not None else 0.0

    def make_plan(self, config: Sequence[str], placement: Sequence[str], accuracy: float | None = None) -> Plan:
        """The plan of ``config`` on ``placement``, with its predicted figures."""
        config, placement = tuple(config), tuple(placement)
        ids = tuple(self.block(v, s) for s, v in enumerate(config))
        block_ms = tuple(self.block_ms[(b, p)] for b, p in zip(ids, placement, strict=True))
        transfers = tuple(self.transfer_ms(placement[s], placement[s + 1], ids[s]) for s in range(len(ids) - 1))
        acc = self.accuracies([config])[0] if accuracy is None else accuracy
        memory = sum(self.memory_bytes.get(b, 0) for b, _p in dict.fromkeys(zip(ids, placement, strict=True)))
        total = sum(block_ms) + sum(transfers) + (self.dispatch_ms(placement[0]) if placement else 0.0)
        return Plan(task=self.task, config=config, placement=placement, block_ids=ids, latency_ms=float(total),
                    block_ms=block_ms, transfer_ms=transfers, accuracy=float(acc), memory_bytes=int(memory))
