"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""
import time


def timed(fn) -> float:
    """Seconds one call of fn takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of fn, in seconds: the least disturbed by a noisy machine."""
    return min(timed(fn) for _ in range(repeats))
