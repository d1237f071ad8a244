"""Per-call overhead: training forward on a small [256, 64] float32 tensor, where launching
the op costs more than the arithmetic. tfbn vs tf.raw_ops.FusedBatchNormV3, eagerly and
inside tf.function.

Each timed sample is a batch of CALLS back-to-back calls; the figure is the median over
the samples of (batch time / CALLS), in microseconds.
"""

import statistics

import tensorflow as tf

import tfbn
from tfbn._library import ops as tfbn_ops
from timing import round_robin

SHAPE = (256, 64)
CALLS = 100


def _contenders():
    x = tf.random.stateless_normal(SHAPE, seed=(1, 2))
    x4 = tf.reshape(x, (SHAPE[0], 1, 1, SHAPE[1]))  # FusedBatchNormV3 needs 4-D: reshaped once
    scale, offset = tf.ones([SHAPE[1]]), tf.zeros([SHAPE[1]])
    empty = tf.zeros([0])

    def api():
        return tfbn.batch_norm(x, scale, offset)

    def raw_op():
        return tfbn_ops.tfbn_batch_norm(x, scale, offset, empty, empty, empty, is_training=True)

    def fused():
        return tf.raw_ops.FusedBatchNormV3(
            x=x4, scale=scale, offset=offset, mean=empty, variance=empty, is_training=True
        )

    return {
        "tfbn eager (tfbn.batch_norm)": api,
        "tfbn eager (raw op, no Python wrapper)": raw_op,
        "FusedBatchNormV3 eager": fused,
        "tfbn tf.function": tf.function(api),
        "FusedBatchNormV3 tf.function": tf.function(fused),
    }


def _batched(fn):
    def run():
        for _ in range(CALLS):
            out = fn()
        return out

    return run


def run(quick=False):
    fns = {name: _batched(fn) for name, fn in _contenders().items()}
    reps = 5 if quick else 20
    samples, _ = round_robin(fns, reps, reps, budget_s=0.0, warmup=1)
    us = {name: 1e6 * statistics.median(s) / CALLS for name, s in samples.items()}
    return {
        "shape": list(SHAPE), "dtype": "float32", "mode": "train_fwd", "calls_per_sample": CALLS,
        "samples": reps, "us_per_call": us,
        "ratio_eager": us["tfbn eager (tfbn.batch_norm)"] / us["FusedBatchNormV3 eager"],
        "ratio_eager_raw_op": (us["tfbn eager (raw op, no Python wrapper)"]
                               / us["FusedBatchNormV3 eager"]),
        "ratio_tf_function": us["tfbn tf.function"] / us["FusedBatchNormV3 tf.function"],
    }
