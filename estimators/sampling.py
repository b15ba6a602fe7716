"""Which configs to measure, when only a few of the V**K can be: three deterministic strategies.

``random_sample`` (uniform, the reference), ``stratified_sample`` (uniform configs plus
Latin-square rounds rich in new adjacent pairs) and ``active_sample`` (a stratified
seed, then where a bootstrap ensemble disagrees most). Stratified is the safer choice
at tiny budgets; active pays from about 50 measured configs (figures:
``docs/estimators.md``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Config = tuple[str, ...]


def config_space(variants: Sequence[str], k: int) -> list[Config]:
    """Every config of ``k`` slots over ``variants`` (V**k of them), in lexicographic order."""
    return [tuple(c) for c in itertools.product(variants, repeat=k)]


def random_sample(space: Sequence[Sequence[str]], n: int, seed: int = 0) -> list[Config]:
    """``n`` distinct configs of ``space`` drawn uniformly (all of them when n >= len(space))."""
    configs = list(dict.fromkeys(tuple(c) for c in space))
    if n >= len(configs):
        return configs
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    return [configs[i] for i in rng.choice(len(configs), size=n, replace=False)]


def stratified_sample(
    variants: Sequence[str],
    k: int,
    n: int,
    seed: int = 0,
    *,
    include_uniform: bool = True,
    candidates: int = 16,
) -> list[Config]:
    """``n`` configs in which each variant fills each slot about equally often.

    The ``V`` uniform configs come first (they are the original variants and anchor
    the estimator on unstitched models); then rounds of ``V`` configs where every
    variant appears exactly once per slot, each the best of ``candidates`` random
    rounds by the number of adjacent pairs it adds that no chosen config has yet. Each
    (slot, variant) count differs from any other by at most one (the last round may be
    partial).

    ``include_uniform=False`` leaves the uniform configs out (and out of every round):
    their accuracy is the variants' standalone accuracy, known without measuring a
    config, so a budget of ``n`` measurements is better spent on ``n`` stitched
    configs, with the uniform ones added to the training rows for free.
    """
    variants = list(dict.fromkeys(variants))
    v = len(variants)
    total = v**k
    uniform = [tuple([x] * k) for x in variants]
    if include_uniform and n < v:
        raise ValueError(f"a stratified sample includes the {v} uniform configs: n must be >= {v}, got {n}")
    if n >= total - (0 if include_uniform else v):
        return [c for c in config_space(variants, k) if include_uniform or len(set(c)) > 1 or k == 1]
    rng = np.random.default_rng(seed)
    chosen: list[Config] = list(uniform) if include_uniform else []
    seen = set(uniform)  # never drawn again (nor at all without include_uniform)
    pairs = _adjacent_pairs(chosen, k)
    stall = 0
    while len(chosen) < n:
        best = _best_round(rng, variants, k, candidates, seen, pairs)
        if best is None:
            stall += 1
            if stall > 50:  # the space is nearly exhausted: fill with unseen configs
                rest = [c for c in config_space(variants, k) if c not in seen]
                order = rng.permutation(len(rest))
                chosen += [rest[i] for i in order[: n - len(chosen)]]
                break
            continue
        stall = 0
        take = best[: n - len(chosen)]
        chosen += take
        seen.update(take)
        pairs |= _adjacent_pairs(take, k)
    return chosen


def _adjacent_pairs(configs: Sequence[Config], k: int) -> set[tuple[int, str, str]]:
    """The ``(slot s, variant at s, variant at s+1)`` seams of ``configs``."""
    return {(s, c[s], c[s + 1]) for c in configs for s in range(k - 1)}


def _best_round(
    rng: np.random.Generator,
    variants: list[str],
    k: int,
    candidates: int,
    seen: set[Config],
    pairs: set[tuple[int, str, str]],
) -> list[Config] | None:
    """Of ``candidates`` random Latin-square rounds, the one adding the most new seams (None: none valid)."""
    v = len(variants)
    best: list[Config] | None = None
    best_gain = -1
    for _ in range(candidates):
        perms = [rng.permutation(v) for _ in range(k)]
        round_ = [tuple(variants[p[i]] for p in perms) for i in range(v)]
        if len(set(round_)) < v or any(c in seen for c in round_):
            continue  # a repeated config would break the one-per-slot balance
        gain = len(_adjacent_pairs(round_, k) - pairs)
        if gain > best_gain:
            best, best_gain = round_, gain
    return best


@dataclass
class ActiveSample:
    """What ``active_sample`` measured, in order, and why."""

    configs: list[Config]
    values: list[float]
    #: configs picked in each round (round 0: the stratified seed)
    rounds: list[list[Config]] = field(default_factory=list)
    #: the ensemble's largest standard deviation before each round after the seed
    disagreement: list[float] = field(default_factory=list)


def _default_estimator() -> Any:
    from estimators.accuracy import AccuracyEstimator

    return AccuracyEstimator(n_estimators=150, learning_rate=0.08, colsample_bytree=0.5, subsample=0.8)


def _row_source(
    featurize: Callable[[Config], Mapping[str, float]] | Mapping[Config, Mapping[str, float]],
) -> Callable[[Config], Mapping[str, float]]:
    """A config's feature row: looked up in a mapping, or computed once per config."""
    if isinstance(featurize, Mapping):
        return featurize.__getitem__
    cache: dict[Config, Mapping[str, float]] = {}

    def row(c: Config) -> Mapping[str, float]:
        if c not in cache:
            cache[c] = featurize(c)
        return cache[c]

    return row


def _ensemble_spread(
    factory: Callable[[], Any],
    X: list[Mapping[str, float]],
    y: np.ndarray,
    pool_rows: list[Mapping[str, float]],
    *,
    rng: np.random.Generator,
    n_models: int,
    first_seed: int,
) -> np.ndarray:
    """Standard deviation over ``pool_rows`` of ``n_models`` estimators fitted on bootstrap resamples."""
    preds = []
    for m in range(n_models):
        idx = rng.integers(0, len(X), size=len(X))
        est = factory()
        if hasattr(est, "random_state"):
            est.set_params(random_state=first_seed + m)
        est.fit([X[i] for i in idx], y[idx])
        preds.append(est.predict(pool_rows))
    return np.std(np.asarray(preds), axis=0)


def active_sample(
    space: Sequence[Sequence[str]],
    featurize: Callable[[Config], Mapping[str, float]] | Mapping[Config, Mapping[str, float]],
    measure: Callable[[list[Config]], Sequence[float]],
    n: int,
    *,
    seed: int = 0,
    known: Mapping[Config, float] | None = None,
    initial: int | None = None,
    batch: int = 2,
    n_models: int = 8,
    make_estimator: Callable[[], Any] | None = None,
) -> ActiveSample:
    """Measure ``n`` configs of ``space``, chosen where a bootstrap ensemble disagrees most.

    ``featurize(config)`` gives the estimator's row (e.g. ``config_features``);
    ``measure(configs)`` returns their measured values (accuracy, from
    ``evaluate_configs``) and is called once per round. ``known`` values (the uniform
    configs' accuracy is each variant's standalone accuracy) join the training rows
    without counting against ``n`` and are never measured again; the uniform configs
    are then left out of the stratified seed too. The first round is a stratified
    sample of ``initial`` configs (default: three quarters of ``n``); each later round
    fits ``n_models`` estimators on bootstrap resamples of everything known so far and
    measures the ``batch`` unmeasured configs with the largest standard deviation of
    their predictions.
    """
    configs = list(dict.fromkeys(tuple(c) for c in space))
    if not configs:
        raise ValueError("the config space is empty")
    known = {tuple(c): float(v) for c, v in (known or {}).items()}
    n = min(n, len([c for c in configs if c not in known]))
    row = _row_source(featurize)
    factory = make_estimator or _default_estimator
    result = ActiveSample(configs=[], values=[])
    _take(result, measure, _seed_round(configs, known, n, initial, seed))
    rng = np.random.default_rng(seed)
    while len(result.configs) < n:
        measured = set(result.configs) | set(known)
        pool = [c for c in configs if c not in measured]
        if not pool:
            break
        train = list(known) + result.configs
        X = [row(c) for c in train]
        y = np.asarray(list(known.values()) + result.values)
        spread = _ensemble_spread(factory, X, y, [row(c) for c in pool], rng=rng, n_models=n_models,
                                  first_seed=seed * 1000 + len(result.rounds) * n_models)
        want = min(batch, n - len(result.configs))
        # stable order: ties (common with few, shallow trees) go to the earlier config in space
        order = np.argsort(-spread, kind="stable")[:want]
        result.disagreement.append(float(spread[order[0]]))
        _take(result, measure, [pool[i] for i in order])
    return result


def _seed_round(configs: list[Config], known: Mapping[Config, float], n: int, initial: int | None,
                seed: int) -> list[Config]:
    """``active_sample``'s first round: a stratified sample of the configs not ``known``."""
    k = len(configs[0])
    variants = list(dict.fromkeys(x for c in configs for x in c))
    uniform_known = all(tuple([x] * k) in known for x in variants)
    floor = 0 if uniform_known else len(variants)
    first = initial if initial is not None else (3 * n) // 4
    first = min(max(first, floor, 1), n)
    space_set = set(configs)
    return [c for c in stratified_sample(variants, k, first, seed, include_uniform=not uniform_known)
            if c in space_set and c not in known]


def _take(result: ActiveSample, measure: Callable[[list[Config]], Sequence[float]], round_: list[Config]) -> None:
    """Measure one round and record it in ``result``."""
    values = [float(x) for x in measure(list(round_))]
    if len(values) != len(round_):
        raise ValueError(f"measure returned {len(values)} values for {len(round_)} configs")
    result.configs += round_
    result.values += values
    result.rounds.append(list(round_))


__all__ = ["ActiveSample", "Config", "active_sample", "config_space", "random_sample", "stratified_sample"]
