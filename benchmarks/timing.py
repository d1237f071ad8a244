"""Timing, bandwidth floor and memory measurement shared by the benchmarks."""

import concurrent.futures
import functools
import os
import statistics
import time

import numpy as np
import tensorflow as tf

from tfbn import _core

CPU = "CPU:0"


def median_ms(samples):
    return 1e3 * statistics.median(samples)


LLC_FALLBACK = 32 * 2**20


def llc_bytes(path="/sys/devices/system/cpu/cpu0/cache/index3/size"):
    """The last-level (L3) cache size in bytes as Linux reports it ("32768K"); 32 MiB where
    the file is missing or unreadable."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text[:-1]) * units[text[-1].upper()] if text[-1].isalpha() else int(text)
    except (OSError, ValueError, KeyError, IndexError):
        return LLC_FALLBACK


def stream_copiers(nbytes):
    """Callables copying nbytes with tfbn._core.stream_copy (it moves 2 x nbytes) on one
    thread and on every core. Both are timed because on a small shared machine starting
    the copy's threads can cost more than the copy; the faster sets the floor.

    Both buffers are written once up front so that page faults are not timed.
    """
    src, dst = _buffers(nbytes)
    return {
        "1 thread": lambda: _core.stream_copy(src, dst, threads=1),
        "all cores": lambda: _core.stream_copy(src, dst, threads=0),
    }


@functools.lru_cache(maxsize=1)
def _buffers(nbytes):
    # Kept from one case to the next (most cases ask for the same size): no fresh pages.
    return np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)


def dram_bytes(nbytes, llc=None):
    """The DRAM yardstick's buffer size: at least 4 x the last-level cache, so that the
    copy streams from and to memory whatever the tensor's size."""
    return max(nbytes, 4 * (llc or llc_bytes()))


def dram_copiers(nbytes, llc=None):
    """{name: (callable, bytes moved per call)}: stream_copy (non-temporal stores) of
    dram_bytes(nbytes), on one thread and on every core; the faster gives the DRAM
    bandwidth."""
    size = dram_bytes(nbytes, llc)
    return {"dram " + name: (fn, 2 * size) for name, fn in stream_copiers(size).items()}


CACHE_COPIES = 8


@functools.lru_cache(maxsize=None)
def _pool(workers):
    return concurrent.futures.ThreadPoolExecutor(workers)


def cache_copiers(llc=None, copies=CACHE_COPIES):
    """{name: (callable, bytes moved per call)}: a copy with ordinary stores (np.copyto)
    of a buffer of a quarter of the last-level cache, so that source and destination stay
    in it. One call makes `copies` back-to-back copies, the first warming the cache after
    round_robin's untimed call has already done so: the timed figure is the warm per-copy
    time. On one thread and split over every core (numpy releases the GIL while copying);
    the faster gives the cache bandwidth."""
    size = (llc or llc_bytes()) // 4
    src, dst = np.ones(size, np.uint8), np.zeros(size, np.uint8)
    cores = os.cpu_count() or 1
    step = -(-size // cores)
    parts = [(src[i:i + step], dst[i:i + step]) for i in range(0, size, step)]
    pool = _pool(len(parts))

    def part(s, d):
        for _ in range(copies):
            np.copyto(d, s)

    def one_thread():
        part(src, dst)

    def all_cores():
        for f in [pool.submit(part, s, d) for s, d in parts]:
            f.result()

    moved = 2 * size * copies
    return {"cache 1 thread": (one_thread, moved), "cache all cores": (all_cores, moved)}


def round_robin(callables, reps, min_reps, budget_s, warmup=2, floor=None, block=1):
    """Times each callable over `reps` rounds, interleaved, so that a noisy machine's slow
    moments spread over all of them instead of landing on one.

    The starting callable rotates each round. With block=1 a round makes one timed call of
    each callable, right after whatever the previous one left in the caches. With block > 1
    a round makes, per callable, one untimed call and then `block` timed calls back to
    back, and keeps their median: each callable is timed warm, on its own inputs and
    outputs as a training loop calling it again would leave them, not on the cache state
    another contender happened to leave (which differs from one contender to the next).
    Stops early (after at least min_reps rounds) once budget_s has passed. `floor`
    ({name: callable}, the bandwidth yardstick) ends each round: a short pause, so that
    TensorFlow's idle worker threads stop spinning on the cores, then per floor callable
    one untimed and one timed call.
    Returns ({name: [seconds per round, ...]}, {floor name: [seconds, ...]}).
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
            fn = callables[name]
            if block > 1:
                fn()  # untimed: brings its inputs and outputs back into the caches
            times = []
            for _ in range(block):
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
                del out
            samples[name].append(statistics.median(times))
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
