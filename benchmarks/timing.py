"""Interleaved wall-clock timing: every participant runs once per round, in a freshly
shuffled order, so that a slow period of a shared machine hits all of them alike.

Why shuffled, and why a pause before each sample: a runtime's worker threads keep
spinning for a while after its call returns (PyTorch's OpenMP pool most of all), and
take a core from whatever runs next. Measured here on 2 cores (jbn vs flax.linen,
fwd+bwd, 64x32x32x64 float32): the library that ran right after PyTorch was about 40 %
slower; a 10-20 ms pause removed the effect. A fixed rotating order kept each
participant's predecessor the same in every round, so the same library paid every time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Timing(NamedTuple):
    """Seconds per call over the rounds (one sample per round)."""

    samples: np.ndarray

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def q25(self) -> float:
        return float(np.percentile(self.samples, 25))

    @property
    def q75(self) -> float:
        return float(np.percentile(self.samples, 75))


def interleaved(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    min_sample_s: float = 2e-3,
    settle_s: float = 0.02,
    seed: int = 0,
) -> dict[str, Timing]:
    """Time each zero-argument callable `rounds` times, interleaved.

    Each callable is first run twice (compilation, warm caches). In every round the
    callables run in a new random order (seeded), each after a pause of `settle_s` that
    lets the previous one's threads go idle. A sample is the mean of enough back-to-back
    calls to last about `min_sample_s`, so that tiny shapes are not all timer noise.
    """
    repeat = {}
    for name, call in calls.items():
        call()
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        repeat[name] = max(1, math.ceil(min_sample_s / max(once, 1e-9)))
    names = list(calls)
    samples = {name: [] for name in names}
    order = np.random.default_rng(seed)
    for _ in range(rounds):
        for i in order.permutation(len(names)):
            name = names[i]
            call, n = calls[name], repeat[name]
            time.sleep(settle_s)
            start = time.perf_counter()
            for _ in range(n):
                call()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: Timing(np.asarray(s)) for name, s in samples.items()}


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a/b: rounds are paired, so drift between rounds cancels."""
    return float(np.median(a.samples / b.samples))
