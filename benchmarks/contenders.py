"""The Batch Normalization implementations under test, each as a tf.function per mode.

A contender's `build(case, mode, inputs)` returns a zero-argument callable (a traced
tf.function bound to its inputs) or raises NotApplicable with the reason. Modes:
  "train_fwd"  training forward: y and the batch statistics
  "train_bwd"  training forward + backward: gradients of x, scale and offset
  "infer"      inference forward with given mean and variance
Every contender gets the same x, scale, offset, mean, variance and upstream gradient dy.
"""

import keras
import tensorflow as tf

import tfbn

EPSILON = 1e-3
MODES = ("train_fwd", "train_bwd", "infer")


class NotApplicable(Exception):
    """This contender cannot run this case; the message says why."""


def _grads(fwd, x, params, dy):
    with tf.GradientTape() as tape:
        tape.watch([x] + [p for p in params if isinstance(p, tf.Tensor)])  # variables are watched
        y = fwd()
    return tape.gradient(y, [x] + list(params), output_gradients=dy)


def _bind(fn, mode, x, params, dy):
    """fn(training) -> y or (y, stats...); returns the traced callable for `mode`."""
    if mode == "train_fwd":
        return tf.function(lambda: fn(True))
    if mode == "infer":
        return tf.function(lambda: fn(False))
    first = lambda: (lambda out: out[0] if isinstance(out, tuple) else out)(fn(True))  # noqa: E731
    return tf.function(lambda: _grads(first, x, params, dy))


# ---- tfbn ------------------------------------------------------------------------------


def tfbn_op(case, mode, t):
    def fn(training):
        if training:
            return tfbn.batch_norm(t.x, t.scale, t.offset, axis=case.axis, epsilon=EPSILON)
        return tfbn.batch_norm(
            t.x, t.scale, t.offset, t.mean, t.variance,
            axis=case.axis, epsilon=EPSILON, training=False,
        )

    return _bind(fn, mode, t.x, [t.scale, t.offset], t.dy)


def _layer(cls, case, mode, t):
    policy = "float32" if t.x.dtype == tf.float32 else f"mixed_{t.x.dtype.name}"
    layer = cls(axis=case.axis, epsilon=EPSILON, dtype=policy)
    layer.build(t.x.shape)
    layer.set_weights([t.scale.numpy(), t.offset.numpy(), t.mean.numpy(), t.variance.numpy()])
    fn = lambda training: layer(t.x, training=training)  # noqa: E731
    return _bind(fn, mode, t.x, [layer.gamma, layer.beta], t.dy)


def tfbn_layer(case, mode, t):
    return _layer(tfbn.BatchNormalization, case, mode, t)


# ---- anchors ---------------------------------------------------------------------------


def keras_layer(case, mode, t):
    return _layer(keras.layers.BatchNormalization, case, mode, t)


def _fused_format(case):
    """How TensorFlow's FusedBatchNormV3 takes this case: (4-D/5-D shape, data_format)."""
    rank, axis = len(case.shape), case.axis % len(case.shape)
    if rank == 4:
        return case.shape, {3: "NHWC", 1: "NCHW"}.get(axis)
    if rank == 5:
        return case.shape, {4: "NDHWC", 1: "NCDHW"}.get(axis)
    if rank == 2 and axis == 1:  # [N, C] as N images of 1x1 pixels, a free reshape
        return (case.shape[0], 1, 1, case.shape[1]), "NHWC"
    return case.shape, None


def fused_v3(case, mode, t):
    shape, fmt = _fused_format(case)
    if fmt is None:
        raise NotApplicable(f"FusedBatchNormV3 has no data_format for rank {len(case.shape)}, "
                            f"axis {case.axis}")
    empty = tf.zeros([0], tf.float32)

    def fn(training):
        y, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
            x=tf.reshape(t.x, shape), scale=t.scale, offset=t.offset,
            mean=empty if training else t.mean, variance=empty if training else t.variance,
            epsilon=EPSILON, data_format=fmt, is_training=training,
        )
        return tf.reshape(y, case.shape), mean, var

    return _bind(fn, mode, t.x, [t.scale, t.offset], t.dy)


def composite(case, mode, t):
    """tf.nn.moments + tf.nn.batch_normalization, in x's dtype, as a user would write it."""
    rank, axis = len(case.shape), case.axis % len(case.shape)
    axes = [d for d in range(rank) if d != axis]
    bshape = [case.shape[axis] if d == axis else 1 for d in range(rank)]
    as_x = lambda v: tf.reshape(tf.cast(v, t.x.dtype), bshape)  # noqa: E731

    def fn(training):
        if training:
            mean, var = tf.nn.moments(t.x, axes, keepdims=True)
        else:
            mean, var = as_x(t.mean), as_x(t.variance)
        y = tf.nn.batch_normalization(t.x, mean, var, as_x(t.offset), as_x(t.scale), EPSILON)
        return y, mean, var

    return _bind(fn, mode, t.x, [t.scale, t.offset], t.dy)


# Name -> builder; the first is the one the others are compared with.
CONTENDERS = {
    "tfbn": tfbn_op,
    "fused_v3": fused_v3,
    "keras": keras_layer,
    "composite": composite,
    "tfbn_layer": tfbn_layer,
}
ANCHORS = ("fused_v3", "keras", "composite")
