"""Per-call overhead: training forward on small float32 tensors, where launching the op costs
more than the arithmetic. tfbn vs tf.raw_ops.FusedBatchNormV3, eagerly and inside
tf.function, on (256, 64) and (256, 1024) [N, C] tensors (FusedBatchNormV3 gets them
reshaped once, outside the timed calls, to [N, 1, 1, C] NHWC) and on a (256, 1, 1, 64)
NHWC tensor that both take as it is.

Each timed sample is a batch of CALLS back-to-back calls; the figure is the median over
the samples of (batch time / CALLS), in microseconds. The top-level keys describe the first
shape, (256, 64), as before; "shapes" holds one such record per shape.
"""

import statistics

import tensorflow as tf

import tfbn
from tfbn._library import ops as tfbn_ops
from timing import round_robin

SHAPES = ((256, 64), (256, 1024), (256, 1, 1, 64))
SHAPE = SHAPES[0]
CALLS = 100


def _contenders(shape):
    x = tf.random.stateless_normal(shape, seed=(1, 2))
    c = shape[-1]
    # FusedBatchNormV3 needs 4-D: [N, C] is reshaped once, here, not in the timed calls
    x4 = x if len(shape) == 4 else tf.reshape(x, (shape[0], 1, 1, c))
    scale, offset = tf.ones([c]), tf.zeros([c])
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


def run_shape(shape, reps):
    fns = {name: _batched(fn) for name, fn in _contenders(shape).items()}
    samples, _ = round_robin(fns, reps, reps, budget_s=0.0, warmup=1)
    us = {name: 1e6 * statistics.median(s) / CALLS for name, s in samples.items()}
    return {
        "shape": list(shape), "us_per_call": us,
        "ratio_eager": us["tfbn eager (tfbn.batch_norm)"] / us["FusedBatchNormV3 eager"],
        "ratio_eager_raw_op": (us["tfbn eager (raw op, no Python wrapper)"]
                               / us["FusedBatchNormV3 eager"]),
        "ratio_tf_function": us["tfbn tf.function"] / us["FusedBatchNormV3 tf.function"],
    }


def run(quick=False):
    reps = 5 if quick else 20
    shapes = [run_shape(shape, reps) for shape in SHAPES]
    return {
        **shapes[0], "dtype": "float32", "mode": "train_fwd", "calls_per_sample": CALLS,
        "samples": reps, "shapes": shapes,
    }
