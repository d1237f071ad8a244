"""Inference BatchNormalization (and its epilogue) as TensorFlow's standard ops.

A graph built from these runs wherever TensorFlow runs without tfbn's op library: a
SavedModel served by TF Serving or loaded in a process that never imports tfbn, and the
TFLite converter. 4-D channels-last data in float16/bfloat16/float32 goes through
FusedBatchNormV3 (is_training=False), which grappler's remapper folds into a preceding
Conv2D and which TFLite folds into the convolution's weights; everything else is the
composite (x - mean) * (rsqrt(variance + epsilon) * scale) + offset.
"""

import numpy as np
import tensorflow as tf

_FUSED_V3_DTYPES = (tf.float16, tf.bfloat16, tf.float32)


def _activation(z, activation):
    if activation == "identity":
        return z
    if activation == "relu":
        return tf.nn.relu(z)
    if activation == "relu6":
        return tf.nn.relu6(z)
    if activation == "silu":
        # Not tf.nn.silu: its custom gradient leaves an IdentityN in the graph, which adds
        # nothing here and which some converters handle poorly.
        return z * tf.sigmoid(z)
    raise ValueError(f"tfbn: unknown activation {activation!r}")


def batch_norm_inference(x, scale, offset, mean, variance, *, axis, epsilon,
                         residual=None, activation="identity"):
    """activation(BN(x) + residual) with the given statistics, as standard TF ops.

    x is float16/bfloat16/float32/float64 of known rank >= 2; scale/offset may be None
    (1/0); the per-channel vectors are float32 (float64 for float64 x); residual has x's
    dtype and shape; activation is a canonical name ('identity', 'relu', 'relu6', 'silu').
    """
    rank = x.shape.rank
    axis = axis + rank if axis < 0 else axis
    # tfbn's op (and FusedBatchNormV3) keep epsilon as a float32: so does the composite,
    # which then computes the op's function in float64 too.
    epsilon = float(np.float32(epsilon))
    channels = tf.shape(mean)[0]
    if scale is None:
        scale = tf.ones([channels], mean.dtype)
    if offset is None:
        offset = tf.zeros([channels], mean.dtype)
    if rank == 4 and axis == 3 and x.dtype in _FUSED_V3_DTYPES:
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, mean, variance, epsilon=epsilon, data_format="NHWC",
            is_training=False,
        )
        if residual is not None:
            y = y + residual
        return _activation(y, activation)
    # The composite runs in the statistics' precision and rounds to x's dtype once.
    shape = [1] * rank
    shape[axis] = -1
    factor = tf.reshape(tf.math.rsqrt(variance + tf.cast(epsilon, variance.dtype)) * scale,
                        shape)
    z = (tf.cast(x, mean.dtype) - tf.reshape(mean, shape)) * factor + tf.reshape(offset, shape)
    if residual is not None:
        z = z + tf.cast(residual, z.dtype)
    return tf.cast(_activation(z, activation), x.dtype)
