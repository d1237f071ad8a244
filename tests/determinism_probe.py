"""Runs forward + backward with a given intra-op thread count; prints a digest of the bytes.

Used by test_determinism.py in fresh processes (the thread count must be set before
TensorFlow starts its pools).
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
    cases = [((32, 28, 28, 32), -1), ((32, 32, 28, 28), 1), ((4096, 256), -1),
             ((8, 8, 16, 16, 16), 1)]
    for shape, axis in cases:
        for dtype in (tf.float32, tf.bfloat16, tf.float16, tf.float64):
            x = tf.cast(tf.constant(rng.normal(3.0, 2.0, shape).astype(np.float32)), dtype)
            dy = tf.cast(tf.constant(rng.normal(size=shape).astype(np.float32)), dtype)
            pdt = tf.float64 if dtype == tf.float64 else tf.float32
            scale = tf.constant(rng.uniform(0.5, 1.5, shape[axis]), pdt)
            with tf.GradientTape() as tape:
                tape.watch([x, scale])
                y, mean, var = tfbn.batch_norm(x, scale, axis=axis)
                loss = tf.reduce_sum(y * dy)
            dx, dscale = tape.gradient(loss, [x, scale])
            for t in (y, mean, var, dx, dscale):
                h.update(t.numpy().tobytes())
    return h.hexdigest()


print(digest())
