"""Op benchmark: tfbn vs TensorFlow's and Keras' Batch Normalization on ResNet-50 shapes.

Per (shape, dtype, mode) case every contender runs in this process on the same inputs,
interleaved with two bandwidth yardsticks that give each case two floors:

- DRAM: tfbn._core.stream_copy (non-temporal stores) of a buffer of at least 4 x the
  last-level cache, so that it streams from and to memory: floor_dram_ms is the mode's
  least traffic at that bandwidth;
- cache: np.copyto (ordinary stores) of a buffer of a quarter of the last-level cache,
  timed warm: floor_cache_ms is the same traffic at that bandwidth, what a kernel could
  reach if x stayed in the cache between its passes (fits_llc says whether it can).

For train_fwd and train_bwd the C++ kernels are also timed without TensorFlow, through
the pybind11 module (tfbn._core, on NumPy views of the same inputs) as "tfbn_core", in
the same rounds; tf_over_core = tfbn's time / tfbn_core's time is what TensorFlow's op
machinery costs on top. For train_fwd, "tfbn_in_graph" runs GRAPH_OPS forwards in one
tf.function (its time / GRAPH_OPS): the op's own time inside a graph, without the cost of
one tf.function call per op; in_graph_over_core = that / tfbn_core's time.

What a timed call covers: a CPU tf.function call returns when its ops have run (the CPU
device executes them synchronously; the outputs are computed tensors, not futures), so the
wall time of the call is the op's time. The timed callables return their output tensors
and nothing copies them out (no .numpy()); the tfbn_core callables return the NumPy arrays
the kernels wrote.
"""

import collections
import sys
import time

import numpy as np
import tensorflow as tf

from contenders import ANCHORS, CONTENDERS, EPSILON, NotApplicable
from timing import (
    cache_copiers,
    dram_copiers,
    llc_bytes,
    median_ms,
    memory_stats_available,
    peak_bytes,
    round_robin,
)

Case = collections.namedtuple("Case", "shape axis layout")
Inputs = collections.namedtuple("Inputs", "x scale offset mean variance dy")

RESNET50 = [(32, 112, 112, 64), (32, 56, 56, 64), (32, 56, 56, 256), (32, 28, 28, 512),
             (32, 14, 14, 1024), (32, 7, 7, 2048)]
SHAPES = (
    [Case(s, -1, "NHWC") for s in RESNET50]
    + [Case((n, c, h, w), 1, "NCHW") for n, h, w, c in RESNET50]
    + [Case((8, 16, 32, 32, 64), -1, "NDHWC"), Case((256, 1024), -1, "NC"),
       Case((4096, 1024), -1, "NC")]
)
QUICK_SHAPES = [Case((32, 56, 56, 64), -1, "NHWC"), Case((32, 28, 28, 512), -1, "NHWC"),
                Case((32, 512, 28, 28), 1, "NCHW"), Case((4096, 1024), -1, "NC")]
DTYPES = ("float32", "bfloat16", "float16")

# Least bytes a fused kernel must move, in units of bytes(x): training forward reads x
# twice (statistics, then normalize) and writes y; forward + backward adds reading x and
# dy twice (gradient sums, then dx) and writing dx; inference reads x and writes y.
TRAFFIC = {"train_fwd": 3, "train_bwd": 8, "infer": 2}

# Timing: ROUNDS rounds (fewer once a case's budget has passed), each making per contender
# one untimed call and BLOCK timed ones back to back (timing.round_robin); a contender's
# time is the median over the rounds of its per-round medians.
ROUNDS = 5
BLOCK = 4


def fits_llc(mode, nbytes, llc):
    """Whether the bytes the case touches fit the last-level cache, taken as its least
    traffic (x, y and, for the backward, dy and dx, counted as often as a fused kernel
    streams them): then passes after the first can hit the cache and beat the DRAM floor."""
    return TRAFFIC[mode] * nbytes <= llc


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


def _numpy(t):
    """A NumPy view of a CPU tensor's buffer (np.asarray shares it; .numpy() would copy):
    the core reads the very bytes the TensorFlow contenders read, so that what one leaves in
    the cache helps the other alike. bfloat16 comes as ml_dtypes.bfloat16, as _core takes it."""
    return np.ascontiguousarray(np.asarray(t))


def core_callable(case, mode, inputs):
    """tfbn's kernels through pybind11 (tfbn._core) on NumPy views of the inputs, threads=0
    as the op uses: training forward, or forward then backward; None for other modes. y and
    dx go into arrays allocated once (`out=`), as TensorFlow's caching allocator hands the op
    memory it has used before: a NumPy array per call above glibc's mmap threshold (32 MiB)
    would be fresh pages to fault in and zero on every call."""
    from tfbn import _core

    if mode not in ("train_fwd", "train_bwd"):
        return None
    x, dy = _numpy(inputs.x), _numpy(inputs.dy)
    scale, offset = _numpy(inputs.scale), _numpy(inputs.offset)
    y, dx = np.empty_like(x), np.empty_like(x)
    kw = {"axis": case.axis, "epsilon": EPSILON}

    def forward():
        return _core.batch_norm_forward(x, scale, offset, training=True, threads=0, out=y, **kw)

    def forward_backward():
        _, mean, variance, mean_lo = forward()
        return y, _core.batch_norm_backward(dy, x, scale, mean, variance, mean_lo, threads=0,
                                            out=dx, **kw)

    return forward if mode == "train_fwd" else forward_backward


# Training forwards per call of the "tfbn_in_graph" callable.
GRAPH_OPS = 8


def in_graph_callable(case, mode, inputs):
    """train_fwd only: one tf.function running GRAPH_OPS tfbn forwards one after the other
    (each waits on the previous one's output; the epsilons differ so that no two ops are
    merged as duplicates). Its time / GRAPH_OPS is the op's own time inside a graph, without
    the per-call cost of a tf.function call (dispatch, waking TensorFlow's pool)."""
    import tfbn

    if mode != "train_fwd":
        return None
    channels = case.shape[case.axis]

    @tf.function
    def forwards():
        total = tf.zeros([channels])
        for i in range(GRAPH_OPS):
            with tf.control_dependencies([total]):
                y, mean, _ = tfbn.batch_norm(inputs.x, inputs.scale, inputs.offset,
                                             axis=case.axis, epsilon=EPSILON * (1 + 1e-3 * i))
            with tf.control_dependencies([y]):
                total = total + mean
        return total

    return forwards


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
    timed = dict(fns)
    core = core_callable(case, mode, inputs)
    if core is not None:
        timed["tfbn_core"] = core
    in_graph = in_graph_callable(case, mode, inputs)
    if in_graph is not None and "tfbn" in fns:
        in_graph()  # traces
        timed["tfbn_in_graph"] = in_graph
    llc = llc_bytes()
    yardsticks = {**dram_copiers(nbytes, llc), **cache_copiers(llc)}
    samples, copies = round_robin(timed, reps, min_reps, budget_s, block=BLOCK,
                                  floor={k: fn for k, (fn, _) in yardsticks.items()})
    reps_done = len(next(iter(copies.values())))
    copy_gbps = {k: yardsticks[k][1] / (median_ms(v) * 1e-3) / 1e9 for k, v in copies.items()}
    dram_gbps = max(v for k, v in copy_gbps.items() if k.startswith("dram"))
    cache_gbps = max(v for k, v in copy_gbps.items() if k.startswith("cache"))
    floor_ms = TRAFFIC[mode] * nbytes / (dram_gbps * 1e9) * 1e3
    floor_cache_ms = TRAFFIC[mode] * nbytes / (cache_gbps * 1e9) * 1e3

    def timing(name):
        ms = median_ms(samples[name])
        return {"ms": ms, "pct_floor": 100.0 * floor_ms / ms,
                "pct_dram_floor": 100.0 * floor_ms / ms,
                "pct_cache_floor": 100.0 * floor_cache_ms / ms}

    for name, fn in fns.items():
        results[name] = {**timing(name), **check.get(name, {})}
        if with_memory:
            results[name]["peak_mb"] = peak_bytes(fn) / 2**20
    base = results["tfbn"].get("ms")
    for name in ANCHORS:
        if base and "ms" in results[name]:
            results[name]["speedup"] = results[name]["ms"] / base
    if "ms" in results["tfbn_layer"] and "ms" in results["keras"]:
        results["tfbn_layer"]["speedup"] = results["keras"]["ms"] / results["tfbn_layer"]["ms"]
    record = {
        "shape": list(case.shape), "axis": case.axis, "layout": case.layout, "dtype": dtype,
        "mode": mode, "nbytes": nbytes, "reps": reps_done, "block": BLOCK,
        # floor_gbps / floor_ms: the DRAM floor under its first names, for older readers
        "floor_gbps": dram_gbps, "floor_ms": floor_ms, "copy_gbps": copy_gbps,
        "dram_gbps": dram_gbps, "cache_gbps": cache_gbps,
        "floor_dram_ms": floor_ms, "floor_cache_ms": floor_cache_ms,
        "llc_bytes": llc, "fits_llc": fits_llc(mode, nbytes, llc),
        "results": {name: results[name] for name in CONTENDERS},
    }
    if core is not None:
        record["results"]["tfbn_core"] = timing("tfbn_core")
        if base:
            record["tf_over_core"] = base / record["results"]["tfbn_core"]["ms"]
    if "tfbn_in_graph" in timed:
        ms = median_ms(samples["tfbn_in_graph"]) / GRAPH_OPS
        record["results"]["tfbn_in_graph"] = {"ms": ms, "ops_per_call": GRAPH_OPS}
        if core is not None:
            record["in_graph_over_core"] = ms / record["results"]["tfbn_core"]["ms"]
    return record


def run(quick=False, reps=ROUNDS, min_reps=3, budget_s=15.0, dtypes=DTYPES, log=sys.stderr):
    """All cases; returns the list of records. Progress goes to `log`, one line a case."""
    shapes = QUICK_SHAPES if quick else SHAPES
    with_memory = memory_stats_available()
    records = []
    # Shape by shape, each in every dtype: a shape's float32 and half-precision cases run
    # within a minute of each other, so that their ratio is not one of a busier and a
    # quieter hour of a shared machine.
    for case in shapes:
        for dtype in dtypes:
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
