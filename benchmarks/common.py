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


def write_result(path, **fields) -> dict:
    """Write one benchmark's JSON result to path, with when, where and with what it was measured
    (UTC time, machine, cores, load average: these machines are noisy, so every number says how
    busy the machine was), and say where it went."""
    import datetime
    import json
    import os
    import platform
    from pathlib import Path

    import jax
    result = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                               python=platform.python_version(), cpus_used=len(os.sched_getaffinity(0)),
                               load_average=os.getloadavg()),
                  jax=jax.__version__, **fields)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return result
