"""Paired comparison of two runs on the same objects: per-object differences and a bootstrap confidence interval.

The paper gives Table 2 without error bars. Two rows of a sweep are scored on the same test objects with the same
seeds, so the question "does this ablation matter?" is best asked of the per-object differences (each object
is its own control), from ``metrics_per_object.csv`` (:func:`gsv3d_pl.metrics.results.read_per_object_csv`):

    diffs, seeds = paired_differences(row_by_seed, full_by_seed, "psnr")  # {uid: mean over seeds of row - full}
    mean, lo, hi = paired_bootstrap(list(diffs.values()))                  # 95% percentile CI, RNG seed 0

Objects are paired by uid *within* a seed (the same test object of the same trained pair of models); an object's
differences are averaged over the seeds in which both runs scored it, and the bootstrap resamples objects: the
interval is about the test set's sampling, the ``± std`` of the table about training seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDiff", "paired_bootstrap", "paired_differences", "paired_t_interval", "BOOTSTRAP_RESAMPLES",
           "BOOTSTRAP_SEED"]

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same folder gives the same interval on every `gsv3d report`

PerObject = Mapping[str, Mapping[str, float]]  # {uid: {metric key: value}}

# two-sided 95% Student-t quantiles by degrees of freedom: a handful of training seeds is too few for a bootstrap
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_t_interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): the 95% Student-t interval of the mean of paired differences, e.g. one per training seed
    (distilled − undistilled of the same seed). One difference gives lo = hi = mean (no interval)."""
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_t_interval: no differences")
    m = float(np.mean(diffs))
    if n < 2:
        return m, m, m
    half = _T95.get(n - 1, 1.96) * float(np.std(diffs, ddof=1)) / math.sqrt(n)
    return m, m - half, m + half


@dataclass(frozen=True)
class PairedDiff:
    """Mean per-object difference (row − reference) of one metric with its bootstrap interval."""

    key: str
    mean: float
    lo: float
    hi: float
    num_objects: int
    num_seeds: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """The interval lies on one side of 0 (the difference is unlikely to be test-set noise)."""
        return self.lo > 0.0 or self.hi < 0.0


def paired_differences(rows: Mapping[int, PerObject], reference: Mapping[int, PerObject], key: str
                       ) -> tuple[dict[str, float], int]:
    """Per object, the mean over seeds of ``rows[seed][uid][key] − reference[seed][uid][key]``.

    Args:
        rows, reference: {seed: {uid: {key: value}}} of the two runs.
        key: the metric (a column of ``metrics_per_object.csv``).

    Returns:
        ({uid: mean difference}, number of seeds that contributed a pair). Objects or seeds only one run has,
        and non-finite values, are left out.
    """
    per_uid: dict[str, list[float]] = {}
    seeds = set()
    for seed, objects in rows.items():
        ref = reference.get(seed)
        if ref is None:
            continue
        for uid, rec in objects.items():
            other = ref.get(uid)
            if other is None or key not in rec or key not in other:
                continue
            a, b = float(rec[key]), float(other[key])
            if math.isfinite(a) and math.isfinite(b):
                per_uid.setdefault(uid, []).append(a - b)
                seeds.add(seed)
    return {uid: sum(v) / len(v) for uid, v in sorted(per_uid.items())}, len(seeds)


def paired_bootstrap(diffs: Sequence[float], num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper): the mean of ``diffs`` and its percentile-bootstrap interval at ``level`` (objects
    resampled with replacement ``num_resamples`` times, ``numpy.random.default_rng(seed)``). All-equal
    differences give a zero-width interval at their value."""
    d = np.asarray(list(diffs), dtype=np.float64)
    if d.size == 0:
        raise ValueError("paired_bootstrap: no differences (no object scored by both runs)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // d.size)  # bounded memory for large test sets
    for start in range(0, num_resamples, chunk):
        stop = min(num_resamples, start + chunk)
        means[start:stop] = d[rng.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0])
    mean = float(d.mean())
    # A zero-width interval must contain the mean exactly (the quantiles of equal floats can differ in the last bit).
    return mean, min(float(lo), mean), max(float(hi), mean)
