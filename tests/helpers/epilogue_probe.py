"""Runs the fused epilogue (every activation, with a residual) forward + backward with a
given intra-op thread count; prints a digest of the bytes.

Used by test_epilogue.py in fresh processes (thread count and TFBN_CPU_ISA must be set
before TensorFlow and the kernels start).
"""

import hashlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))

import tfbn  # noqa: E402


def digest():
    h = hashlib.sha256()
    rng = np.random.default_rng(0)
    # Channels-last with register tiles and a remainder, planar, planar with inner < 16.
    cases = [((16, 14, 14, 80), -1), ((16, 32, 14, 14), 1), ((512, 12, 5), 1)]
    for shape, axis in cases:
        for dtype in (tf.float32, tf.bfloat16, tf.float16, tf.float64):
            pdt = tf.float64 if dtype == tf.float64 else tf.float32
            x = tf.cast(rng.normal(3.0, 2.0, shape), dtype)
            res = tf.cast(rng.normal(size=shape), dtype)
            dy = tf.cast(rng.normal(size=shape), dtype)
            scale = tf.constant(rng.uniform(0.5, 1.5, shape[axis]), pdt)
            offset = tf.constant(rng.uniform(-0.5, 0.5, shape[axis]), pdt)
            for activation in ("relu", "relu6", "silu"):
                for training in (True, False):
                    stats = {} if training else {"mean": offset, "variance": scale}
                    with tf.GradientTape() as tape:
                        tape.watch([x, scale, offset, res])
                        y, _, _ = tfbn.batch_norm(x, scale, offset, axis=axis, residual=res,
                                                  activation=activation, training=training,
                                                  **stats)
                    grads = tape.gradient(y, [x, scale, offset, res], output_gradients=dy)
                    for t in [y] + grads:
                        h.update(t.numpy().tobytes())
    return h.hexdigest()


print(digest())
