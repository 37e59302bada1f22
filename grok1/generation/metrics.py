"""What the engine counts while it serves, for /metrics: requests running and waiting, tokens,
finish reasons, and latency histograms in the Prometheus layout."""

from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Sequence


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {total}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclasses.dataclass
class EngineMetrics:
    """Counters the engine thread updates (under the engine's lock)."""

    slots: int
    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    time_to_first_token: Histogram = dataclasses.field(default_factory=lambda: Histogram(LATENCY_BOUNDS))
    time_per_output_token: Histogram = dataclasses.field(default_factory=lambda: Histogram(LATENCY_BOUNDS))

    @property
    def free(self) -> int:
        """Slots without a request: a newcomer for one of them does not wait (back-pressure)."""
        return self.slots - self.running


def copy_histogram(histogram: Histogram) -> Histogram:
    copy = Histogram(histogram.bounds)
    copy.counts, copy.sum, copy.count = list(histogram.counts), histogram.sum, histogram.count
    return copy
