"""Op benchmark: tfbn vs TensorFlow's and Keras' Batch Normalization on ResNet-50 shapes.

Per (shape, dtype, mode) case every contender runs in this process on the same inputs,
interleaved with the bandwidth yardstick (tfbn._core.stream_copy on a buffer of x's size).
"""

import collections
import sys
import time

import numpy as np
import tensorflow as tf

from contenders import ANCHORS, CONTENDERS, NotApplicable
from timing import median_ms, memory_stats_available, peak_bytes, round_robin, stream_copiers

Case = collections.namedtuple("Case", "shape axis layout")
Inputs = collections.namedtuple("Inputs", "x scale offset mean variance dy")

_RESNET50 = [(32, 112, 112, 64), (32, 56, 56, 256), (32, 28, 28, 512), (32, 14, 14, 1024),
             (32, 7, 7, 2048)]
SHAPES = (
    [Case(s, -1, "NHWC") for s in _RESNET50]
    + [Case((n, c, h, w), 1, "NCHW") for n, h, w, c in _RESNET50]
    + [Case((8, 16, 32, 32, 64), -1, "NDHWC"), Case((256, 1024), -1, "NC"),
       Case((4096, 1024), -1, "NC")]
)
QUICK_SHAPES = [Case((32, 28, 28, 512), -1, "NHWC"), Case((32, 512, 28, 28), 1, "NCHW"),
                Case((4096, 1024), -1, "NC")]
DTYPES = ("float32", "bfloat16", "float16")

# Least bytes a fused kernel must move, in units of bytes(x): training forward reads x
# twice (statistics, then normalize) and writes y; forward + backward adds reading x and
# dy twice (gradient sums, then dx) and writing dx; inference reads x and writes y.
TRAFFIC = {"train_fwd": 3, "train_bwd": 8, "infer": 2}


def make_inputs(case, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = case.shape[case.axis]
    x = rng.standard_normal(case.shape, np.float32) * 2.0 + 0.5
    dy = rng.standard_normal(case.shape, np.float32)
    per_channel = lambda lo, hi: tf.constant(rng.uniform(lo, hi, c).astype(np.float32))  # noqa: E731
    return Inputs(
        x=tf.cast(x, dtype), scale=per_channel(0.5, 1.5), offset=per_channel(-0.5, 0.5),
        mean=per_channel(0.4, 0.6), variance=per_channel(3.5, 4.5), dy=tf.cast(dy, dtype),
    )


# A contender whose y (or dx) differs from Keras' (float32 math) by more than this, relative
# to the largest |value|, is flagged: a fast wrong answer must not pass as a fast one.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.05, "float16": 0.01}


def _agreement(first, dtype):
    if "keras" not in first:
        return {}
    ref = tf.cast(first["keras"], tf.float32)
    scale = max(1.0, float(tf.reduce_max(tf.abs(ref))))
    out = {}
    for name, value in first.items():
        diff = float(tf.reduce_max(tf.abs(tf.cast(value, tf.float32) - ref))) / scale
        out[name] = {"rel_diff_vs_keras": diff, "agrees": diff <= TOLERANCE[dtype]}
    return out


def run_case(case, dtype, mode, inputs, reps, min_reps, budget_s, with_memory):
    """One (shape, dtype, mode): a record with each contender's median and % of floor."""
    nbytes = int(np.prod(case.shape)) * tf.as_dtype(dtype).size
    fns, results, first = {}, {}, {}
    for name, build in CONTENDERS.items():
        try:
            fn = build(case, mode, inputs)
            out = fn()  # traces; the op rejects an unsupported case here
            fns[name], first[name] = fn, out[0] if isinstance(out, (tuple, list)) else out
        except NotApplicable as err:
            results[name] = {"na": str(err)}
        except (tf.errors.OpError, ValueError, TypeError, NotImplementedError) as err:
            results[name] = {"na": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    check = _agreement(first, dtype)
    del first
    samples, copies = round_robin(fns, reps, min_reps, budget_s, floor=stream_copiers(nbytes))
    reps_done = len(next(iter(copies.values())))
    copy_gbps = {k: 2 * nbytes / (median_ms(v) * 1e-3) / 1e9 for k, v in copies.items()}
    gbps = max(copy_gbps.values())
    floor_ms = TRAFFIC[mode] * nbytes / (gbps * 1e9) * 1e3
    for name, fn in fns.items():
        ms = median_ms(samples[name])
        results[name] = {"ms": ms, "pct_floor": 100.0 * floor_ms / ms, **check.get(name, {})}
        if with_memory:
            results[name]["peak_mb"] = peak_bytes(fn) / 2**20
    base = results["tfbn"].get("ms")
    for name in ANCHORS:
        if base and "ms" in results[name]:
            results[name]["speedup"] = results[name]["ms"] / base
    if "ms" in results["tfbn_layer"] and "ms" in results["keras"]:
        results["tfbn_layer"]["speedup"] = results["keras"]["ms"] / results["tfbn_layer"]["ms"]
    return {
        "shape": list(case.shape), "axis": case.axis, "layout": case.layout, "dtype": dtype,
        "mode": mode, "nbytes": nbytes, "reps": reps_done,
        "floor_gbps": gbps, "floor_ms": floor_ms, "copy_gbps": copy_gbps,
        "results": {name: results[name] for name in CONTENDERS},
    }


def run(quick=False, reps=20, min_reps=5, budget_s=15.0, dtypes=DTYPES, log=sys.stderr):
    """All cases; returns the list of records. Progress goes to `log`, one line a case."""
    shapes = QUICK_SHAPES if quick else SHAPES
    with_memory = memory_stats_available()
    records = []
    for dtype in dtypes:
        for case in shapes:
            inputs = make_inputs(case, dtype)
            for mode in TRAFFIC:
                t0 = time.perf_counter()
                rec = run_case(case, dtype, mode, inputs, reps, min_reps, budget_s, with_memory)
                records.append(rec)
                r = rec["results"]
                summary = "  ".join(
                    f"{n}={r[n]['ms']:.2f}" if "ms" in r[n] else f"{n}=n/a" for n in r
                )
                print(f"  {dtype:8s} {case.layout:5s} {str(case.shape):22s} {mode:9s} "
                      f"n={rec['reps']:2d} {summary}  ({time.perf_counter() - t0:.0f}s)",
                      file=log, flush=True)
            del inputs
    return records
