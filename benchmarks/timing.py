"""Timing, bandwidth floor and memory measurement shared by the benchmarks."""

import statistics
import time

import numpy as np
import tensorflow as tf

from tfbn import _core

CPU = "CPU:0"


def median_ms(samples):
    return 1e3 * statistics.median(samples)


def stream_copiers(nbytes):
    """Callables copying nbytes with tfbn._core.stream_copy (it moves 2 x nbytes) on one
    thread and on every core. Both are timed because on a small shared machine starting
    the copy's threads can cost more than the copy; the faster sets the floor.

    Both buffers are written once up front so that page faults are not timed.
    """
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    return {
        "1 thread": lambda: _core.stream_copy(src, dst, threads=1),
        "all cores": lambda: _core.stream_copy(src, dst, threads=0),
    }


def round_robin(callables, reps, min_reps, budget_s, warmup=2, floor=None):
    """Times each callable `reps` times, interleaved, so that a noisy machine's slow
    moments spread over all of them instead of landing on one.

    The starting callable rotates each round. Stops early (after at least min_reps
    rounds) once budget_s has passed. `floor` ({name: callable}, the bandwidth yardstick)
    ends each round: a short pause, so that TensorFlow's idle worker threads stop spinning
    on the cores, then per floor callable one untimed and one timed call.
    Returns ({name: [seconds, ...]}, {floor name: [seconds, ...]}).
    """
    names = list(callables)
    floor = floor or {}
    for name in names:
        for _ in range(warmup):
            callables[name]()
    samples = {name: [] for name in names}
    floor_samples = {name: [] for name in floor}
    start = time.perf_counter()
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            out = callables[name]()
            samples[name].append(time.perf_counter() - t0)
            del out
        if floor:
            time.sleep(0.02)
        for name, copy in floor.items():
            copy()
            t0 = time.perf_counter()
            copy()
            floor_samples[name].append(time.perf_counter() - t0)
        if r + 1 >= min_reps and time.perf_counter() - start > budget_s:
            break
    return samples, floor_samples


def memory_stats_available():
    try:
        tf.config.experimental.reset_memory_stats(CPU)
        tf.config.experimental.get_memory_info(CPU)
        return True
    except (ValueError, tf.errors.OpError):
        return False


def peak_bytes(fn):
    """Peak bytes held in TensorFlow's CPU allocator during one call of fn, above what
    was held just before it (inputs and weights already live are not counted; the
    outputs, alive when the call returns, are). Memory that kernels obtain outside
    TensorFlow's allocator (e.g. library-internal scratch from malloc) is not seen."""
    tf.config.experimental.reset_memory_stats(CPU)
    before = tf.config.experimental.get_memory_info(CPU)["current"]
    out = fn()
    peak = tf.config.experimental.get_memory_info(CPU)["peak"]
    del out
    return peak - before
