"""Runs every CPU kernel family (fused forward and backward, the epilogue, the weighted
split ops) with a given intra-op thread count, and prints one JSON line: the instruction
set the kernels ran on (tfbn._core.cpu_instruction_set_info()) and a digest of the bytes.

Used by test_determinism.py in fresh processes: the thread count must be set before
TensorFlow starts its pools, and TFBN_CPU_ISA is read once per process.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))

import tfbn  # noqa: E402
from tfbn import _core, split  # noqa: E402

# Channels-last rows of whole tiles, of narrower tiles plus a part-filled vector (600 =
# 9 x 64 + 16 + 8; 13), planes of whole lane vectors (28 x 28) and planes that are not (7 x 7).
CASES = [((32, 28, 28, 32), -1), ((32, 32, 28, 28), 1), ((4096, 256), -1),
         ((8, 8, 16, 16, 16), 1), ((6, 9, 9, 600), -1), ((40, 5, 5, 13), -1),
         ((16, 6, 7, 7), 1)]
DTYPES = (tf.float32, tf.bfloat16, tf.float16, tf.float64)


def run(h, rng, shape, axis, dtype, fn):
    x = tf.cast(tf.constant(rng.normal(3.0, 2.0, shape).astype(np.float32)), dtype)
    dy = tf.cast(tf.constant(rng.normal(size=shape).astype(np.float32)), dtype)
    pdt = tf.float64 if dtype == tf.float64 else tf.float32
    scale = tf.constant(rng.uniform(0.5, 1.5, shape[axis]), pdt)
    offset = tf.constant(rng.normal(size=shape[axis]), pdt)
    with tf.GradientTape() as tape:
        tape.watch([x, scale, offset])
        outputs = fn(x, scale, offset)
        loss = tf.reduce_sum(tf.cast(outputs[0], pdt) * tf.cast(dy, pdt))
    grads = tape.gradient(loss, [x, scale, offset])
    for t in list(outputs) + grads:
        h.update(t.numpy().tobytes())


def digest():
    h = hashlib.sha256()
    rng = np.random.default_rng(0)
    for shape, axis in CASES:
        rank_axis = axis % len(shape)
        weight_shape = tuple(d for i, d in enumerate(shape) if i != rank_axis)
        weights = tf.constant((rng.random(weight_shape) < 0.7).astype(np.float32)
                              * rng.uniform(0.5, 2.0, weight_shape).astype(np.float32))
        for dtype in DTYPES:
            residual = tf.cast(tf.constant(rng.normal(size=shape).astype(np.float32)), dtype)
            run(h, rng, shape, axis, dtype,
                lambda x, s, o, axis=axis: tfbn.batch_norm(x, s, o, axis=axis))
            run(h, rng, shape, axis, dtype,
                lambda x, s, o, axis=axis, r=residual: tfbn.batch_norm(
                    x, s, o, axis=axis, residual=r, activation="silu"))
            run(h, rng, shape, axis, dtype,
                lambda x, s, o, axis=axis, w=weights: split.split_batch_norm(
                    x, s, o, axis=axis, epsilon=1e-3, weights=w))
    specials(h)
    return h.hexdigest()


def specials(h):
    """Half-precision outputs at the edges of rounding: float results that are denormal
    (the AVX-512 BF16 instruction flushes those; the kernels must not), that overflow to
    infinity when rounded, NaN, infinities and signed zeros, through the vector lanes and
    the element-by-element tails, in inference (y = x * a, a just below 1)."""
    bits = np.array([0x0001, 0x0003, 0x007F, 0x0080, 0x8005, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80,
                     0x7FC1, 0xFFC0, 0x0000, 0x8000, 0x3F81, 0x00FF, 0x807F, 0x0101], np.uint16)
    values = np.tile(bits, 41)  # 697 values: whole blocks of 16 lanes and a tail
    x_bf16 = tf.bitcast(tf.constant(values), tf.bfloat16)
    x_f16 = tf.bitcast(tf.constant(values), tf.float16)
    for x in (x_bf16, x_f16):
        for shape, axis in (((values.size, 1), -1), ((1, 1, values.size), 1)):
            c = shape[axis]
            y = tfbn.batch_norm(tf.reshape(x, shape), tf.fill([c], 0.999), tf.zeros([c]),
                                tf.zeros([c]), tf.fill([c], 1.0), axis=axis, training=False)[0]
            h.update(tf.bitcast(y, tf.uint16).numpy().tobytes())


print(json.dumps({"digest": digest(), **_core.cpu_instruction_set_info()}))
