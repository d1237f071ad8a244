"""Peak memory of the main op: a call holds its outputs and nothing full-size besides
(the README's "peak memory of a call is its outputs"), measured with TensorFlow's CPU
allocator statistics."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfbn

# The benchmarks' allocator-peak reading, so the test measures what the tables report.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import timing  # noqa: E402

SHAPE = (32, 32, 32, 64)  # 8 MiB of float32: far above the per-channel vectors
SMALL = 1 << 20  # room for the statistics, the mean's low part and allocator rounding


pytestmark = pytest.mark.skipif(not timing.memory_stats_available(),
                                reason="TensorFlow reports no CPU allocator statistics here")


def inputs(dtype):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(SHAPE).astype(np.float32), dtype)
    c = SHAPE[-1]
    return x, tf.ones([c]), tf.zeros([c]), tf.constant(rng.standard_normal(SHAPE), dtype)


def forward(x, scale, offset):
    return tfbn.batch_norm(x, scale, offset)


def backward(x, scale, offset, dy):
    with tf.GradientTape() as tape:
        tape.watch([x, scale, offset])
        y = forward(x, scale, offset)[0]
    # Only the gradient call is measured: y and the saved statistics already exist.
    return lambda: tape.gradient(y, [x, scale, offset], output_gradients=dy)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_training_forward_holds_only_its_outputs(dtype):
    x, scale, offset, _ = inputs(dtype)
    forward(x, scale, offset)  # load and warm up
    nbytes = x.shape.num_elements() * dtype.size
    growth = timing.peak_bytes(lambda: forward(x, scale, offset))
    assert nbytes <= growth <= nbytes + SMALL, (growth, nbytes)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_training_backward_holds_only_its_outputs(dtype):
    x, scale, offset, dy = inputs(dtype)
    backward(x, scale, offset, dy)()  # warm up
    nbytes = x.shape.num_elements() * dtype.size
    growth = timing.peak_bytes(backward(x, scale, offset, dy))
    assert nbytes <= growth <= nbytes + SMALL, (growth, nbytes)
