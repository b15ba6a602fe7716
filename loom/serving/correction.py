"""Online correction of predicted block latencies from what the workers measure.

``corrected_ms = predicted_ms * exp(F[p] + o[b, p])``: a per-processor drift factor ``F``
(relaxing toward 1 while the processor is not observed, so that an avoided processor
gets probed again) and a per-(block, processor) offset ``o`` for the estimator's bias,
both learned online. Thread-safe; ``enabled=False`` makes it an identity (the ablation
baseline). The model, its means and the measurements behind them: docs/serving.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loom.core.errors import ConfigError

__all__ = ["CorrectionView", "LatencyCorrector"]


@dataclass
class _ProcessorState:
    log_factor: float = 0.0
    #: log of the mean ratio left after the (log) factor and offsets ("arithmetic" mean only)
    log_tail: float = 0.0
    last_s: float | None = None
    observations: int = 0


@dataclass
class _PairState:
    log_offset: float = 0.0
    observations: int = 0
    last_ratio: float = 1.0


@dataclass(frozen=True)
class CorrectionView:
    """A consistent, lock-free snapshot of the multipliers at one instant.

    The scheduler takes one per decision and then prices hundreds of candidate plans
    without touching the corrector's lock again.
    """

    enabled: bool
    #: processor -> relaxed log factor at the view's instant
    log_factor: dict[str, float] = field(default_factory=dict)
    #: (block id, processor) -> log offset
    log_offset: dict[tuple[str, str], float] = field(default_factory=dict)

    def multiplier(self, block_id: str, processor: str) -> float:
        if not self.enabled:
            return 1.0
        return math.exp(self.log_factor.get(processor, 0.0) + self.log_offset.get((block_id, processor), 0.0))

    def corrected_ms(self, block_id: str, processor: str, predicted_ms: float) -> float:
        return predicted_ms * self.multiplier(block_id, processor)


class LatencyCorrector:
    """Per (block, processor) and per processor multiplicative correction, learned online.

    ``decay`` / ``processor_decay``: EWMA weights per observation of the offsets / the
    factors; ``half_life_s``: how fast a factor relaxes toward 1 without observations;
    ``max_ratio``: clamp of one measured ratio; ``mean``: ``"arithmetic"`` (default) or
    ``"geometric"``; ``relative``: report factors less what all recent processors share.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        decay: float = 0.9,
        processor_decay: float = 0.7,
        half_life_s: float = 5.0,
        max_ratio: float = 10.0,
        mean: str = "arithmetic",
        tail_decay: float = 0.95,
        relative: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if mean not in ("arithmetic", "geometric"):
            raise ConfigError(f"latency corrector: mean must be 'arithmetic' or 'geometric', got {mean!r}")
        for name, value in (("decay", decay), ("processor_decay", processor_decay), ("tail_decay", tail_decay)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"latency corrector: {name} must be in [0, 1), got {value}")
        if not half_life_s > 0:
            raise ConfigError(f"latency corrector: half_life_s must be > 0, got {half_life_s}")
        if not max_ratio > 1.0:
            raise ConfigError(f"latency corrector: max_ratio must be > 1, got {max_ratio}")
        self.enabled = enabled
        self.decay = float(decay)
        self.processor_decay = float(processor_decay)
        self.half_life_s = float(half_life_s)
        self.max_log_ratio = math.log(max_ratio)
        self.mean = mean
        self.tail_rate = 1.0 - float(tail_decay)
        self.relative = relative
        #: the runtime passes ``now_s`` from the same clock (perf_counter by default)
        self.clock = clock
        self._lock = threading.Lock()
        self._procs: dict[str, _ProcessorState] = {}
        self._pairs: dict[tuple[str, str], _PairState] = {}
        self.observations = 0

    # -- reading ------------------------------------------------------------------------
    def _relaxed(self, state: _ProcessorState | None, now_s: float) -> float:
        if state is None or state.last_s is None:
            return 0.0
        idle = max(0.0, now_s - state.last_s)
        return state.log_factor * 0.5 ** (idle / self.half_life_s)

    def _relaxed_tail(self, state: _ProcessorState | None, now_s: float) -> float:
        if state is None or state.last_s is None:
            return 0.0
        idle = max(0.0, now_s - state.last_s)
        return state.log_tail * 0.5 ** (idle / self.half_life_s)

    def _raw_log(self, state: _ProcessorState | None, now_s: float) -> float:
        """The processor's whole log multiplier now: the factor plus (arithmetic mean) the tail."""
        return self._relaxed(state, now_s) + self._relaxed_tail(state, now_s)

    def _common_log(self, now_s: float) -> float:
        """What every recently observed processor shares (``relative``): the least of their factors."""
        if not self.relative:
            return 0.0
        recent = [self._raw_log(s, now_s) for s in self._procs.values()
                  if s.last_s is not None and now_s - s.last_s < 2 * self.half_life_s]
        return min(recent) if len(recent) >= 2 else 0.0

    def _processor_log(self, state: _ProcessorState | None, now_s: float) -> float:
        """The processor's log multiplier as the scheduler sees it (relative: less the common part)."""
        if state is None:
            return 0.0
        return self._raw_log(state, now_s) - self._common_log(now_s)

    def processor_factor(self, processor: str, *, now_s: float | None = None) -> float:
        """The multiplier a block never observed on ``processor`` gets now."""
        if not self.enabled:
            return 1.0
        now = self.clock() if now_s is None else now_s
        with self._lock:
            return math.exp(self._processor_log(self._procs.get(processor), now))

    def multiplier(self, block_id: str, processor: str, *, now_s: float | None = None) -> float:
        if not self.enabled:
            return 1.0
        now = self.clock() if now_s is None else now_s
        with self._lock:
            pair = self._pairs.get((block_id, processor))
            log = self._processor_log(self._procs.get(processor), now) + (pair.log_offset if pair else 0.0)
        return math.exp(log)

    def corrected_ms(self, block_id: str, processor: str, predicted_ms: float, *, now_s: float | None = None) -> float:
        """``predicted_ms`` corrected by what was measured on ``processor`` so far."""
        if not self.enabled:
            return predicted_ms
        return predicted_ms * self.multiplier(block_id, processor, now_s=now_s)

    def view(self, now_s: float | None = None) -> CorrectionView:
        """Every multiplier at ``now_s``, copied once (cheap: tens to hundreds of entries)."""
        if not self.enabled:
            return CorrectionView(False)
        now = self.clock() if now_s is None else now_s
        with self._lock:
            common = self._common_log(now)
            factors = {p: self._raw_log(s, now) - common for p, s in self._procs.items()}
            offsets = {k: s.log_offset for k, s in self._pairs.items() if s.log_offset}
        return CorrectionView(True, factors, offsets)

    # -- learning -------------------------------------------------------------------------
    def observe(
        self,
        block_id: str,
        processor: str,
        predicted_ms: float,
        measured_ms: float,
        now_s: float | None = None,
    ) -> None:
        """One run of ``block_id`` on ``processor`` took ``measured_ms`` against ``predicted_ms``."""
        if not (predicted_ms > 0 and measured_ms > 0 and math.isfinite(predicted_ms) and math.isfinite(measured_ms)):
            return  # a zero or broken prediction says nothing about a ratio
        now = self.clock() if now_s is None else now_s
        x = max(-self.max_log_ratio, min(self.max_log_ratio, math.log(measured_ms / predicted_ms)))
        with self._lock:
            self.observations += 1
            if not self.enabled:
                return
            proc = self._procs.setdefault(processor, _ProcessorState())
            pair = self._pairs.setdefault((block_id, processor), _PairState())
            # relax first: the factor learned before an idle gap is older evidence
            f = self._relaxed(proc, now)
            a = 1.0 - self.processor_decay
            b = 1.0 - self.decay
            if self.mean == "arithmetic":
                # what the log model leaves, averaged as a ratio: a processor time-sliced
                # with another process runs most blocks at full speed and a few several
                # times slower; the mean ratio is what that costs, the log mean hides it.
                # Kept apart from F and o (fed back into them, the two drift apart).
                t = self._relaxed_tail(proc, now)
                resid = math.exp(x - f - pair.log_offset)
                # slower than F (tail_decay 0.95: ~20 observations): it averages rare events
                proc.log_tail = math.log(max(1e-6, math.exp(t) + self.tail_rate * (resid - math.exp(t))))
            f += a * ((x - pair.log_offset) - f)
            pair.log_offset += b * ((x - f) - pair.log_offset)
            proc.log_factor, proc.last_s = f, now
            proc.observations += 1
            pair.observations += 1
            pair.last_ratio = math.exp(x)

    def reset(self) -> None:
        with self._lock:
            self._procs.clear()
            self._pairs.clear()
            self.observations = 0

    # -- reporting ------------------------------------------------------------------------
    def snapshot(self, now_s: float | None = None) -> dict[str, Any]:
        """Plain data for reports: factors per processor and per (block, processor)."""
        now = self.clock() if now_s is None else now_s
        with self._lock:
            procs = {
                p: {
                    "factor": math.exp(self._processor_log(s, now)) if self.enabled else 1.0,
                    "tail": math.exp(self._relaxed_tail(s, now)),
                    "learned_factor": math.exp(s.log_factor),
                    "observations": s.observations,
                    "idle_s": None if s.last_s is None else max(0.0, now - s.last_s),
                }
                for p, s in self._procs.items()
            }
            blocks = [
                {
                    "block_id": b,
                    "processor": p,
                    "multiplier": math.exp(self._processor_log(self._procs.get(p), now) + s.log_offset)
                    if self.enabled
                    else 1.0,
                    "offset": math.exp(s.log_offset),
                    "last_ratio": s.last_ratio,
                    "observations": s.observations,
                }
                for (b, p), s in self._pairs.items()
            ]
        return {
            "enabled": self.enabled,
            "decay": self.decay,
            "processor_decay": self.processor_decay,
            "half_life_s": self.half_life_s,
            "observations": self.observations,
            "processors": procs,
            "blocks": blocks,
        }
