"""Gradients of tfbn.batch_norm: reference formula, numerical gradients, autodiff of the
composite formula, gradients through the statistics outputs, second order."""

import numpy as np
import pytest
import tensorflow as tf

import reference as ref
import tfbn
from test_ops import DTYPES, LAYOUTS, make_inputs, param_np


def composite(x, scale, offset, mean=None, variance=None, axis=-1, epsilon=1e-3,
              training=True):
    """BatchNorm as plain TensorFlow ops (autodiff reference)."""
    rank = x.shape.rank
    axis %= rank
    axes = [d for d in range(rank) if d != axis]
    bshape = [1] * rank
    bshape[axis] = -1
    if training:
        mean, variance = tf.nn.moments(x, axes)
    r = tf.math.rsqrt(variance + ref.op_epsilon(epsilon))
    return ((x - tf.reshape(mean, bshape)) * tf.reshape(r * scale, bshape)
            + tf.reshape(offset, bshape)), mean, variance


def grads(fn, x, scale, offset, dy, **kw):
    x, scale, offset = (tf.constant(v) for v in (x, scale, offset))
    with tf.GradientTape() as tape:
        tape.watch([x, scale, offset])
        y = fn(x, scale, offset, **kw)[0]
        loss = tf.reduce_sum(y * tf.cast(dy, y.dtype))
    return tape.gradient(loss, [x, scale, offset])


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_reference(rng, shape, axis, dtype_name, training):
    x, scale, offset = make_inputs(rng, shape, axis, dtype_name)
    dy = rng.standard_normal(shape).astype(x.dtype)
    p = param_np(dtype_name)
    mean = rng.standard_normal(shape[axis]).astype(p)
    var = rng.uniform(0.5, 2.0, shape[axis]).astype(p)
    kw = dict(axis=axis, training=training)
    if not training:
        kw.update(mean=mean, variance=var)
    dx, dscale, doffset = grads(tfbn.batch_norm, x, scale, offset, dy, **kw)
    dx_ref, dscale_ref, doffset_ref = ref.backward(dy, x, scale, mean, var, axis=axis,
                                                   training=training)
    ref.assert_close(dx, dx_ref, dtype_name, "dx")
    # The sums are taken in double over the same (rounded) values as the reference's, so
    # dscale/doffset are exact up to their float32 (or float64) rounding for every dtype.
    tol = 1e-9 if dtype_name == "float64" else 1e-5
    np.testing.assert_allclose(dscale, dscale_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(doffset, doffset_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,axis", [((3, 4, 2), -1), ((2, 3, 2, 2), 1), ((5, 3), 0)])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_numerical(rng, shape, axis, training):
    x, scale, offset = make_inputs(rng, shape, axis, "float64")
    c = shape[axis]
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    w = tf.constant(rng.standard_normal(shape))

    def f(x, scale, offset, mean, var):
        y, bm, bv = tfbn.batch_norm(x, scale, offset, mean, var, axis=axis, training=training)
        # Use the statistics outputs too: their gradients must reach x (training) or the
        # mean/variance inputs (inference).
        return tf.reduce_sum(y * w) + tf.reduce_sum(bm * bm) + tf.reduce_sum(bv)

    theoretical, numerical = tf.test.compute_gradient(f, [x, scale, offset, mean, var])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_composite_autodiff(rng, shape, axis, training):
    x, scale, offset = make_inputs(rng, shape, axis, "float64")
    dy = rng.standard_normal(shape)
    kw = dict(axis=axis, training=training)
    if not training:
        kw.update(mean=rng.standard_normal(shape[axis]),
                  variance=rng.uniform(0.5, 2.0, shape[axis]))
    got = grads(tfbn.batch_norm, x, scale, offset, dy, **kw)
    want = grads(composite, x, scale, offset, dy, **kw)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape,axis", [((4, 3), -1), ((2, 3, 2, 2), 1)])
def test_second_order_gradients_match_numerical(rng, shape, axis):
    x, scale, offset = make_inputs(rng, shape, axis, "float64")
    w = tf.constant(rng.standard_normal(shape))
    v = tf.constant(rng.standard_normal(shape))

    def first_order(x, scale, offset):
        with tf.GradientTape() as tape:
            tape.watch([x, scale, offset])
            y, _, _ = tfbn.batch_norm(x, scale, offset, axis=axis)
            loss = tf.reduce_sum(y * w) + tf.reduce_sum(y**3) * 0.1
        dx, dscale, doffset = tape.gradient(loss, [x, scale, offset])
        return tf.reduce_sum(dx * v) + tf.reduce_sum(dscale**2) + tf.reduce_sum(dx * dx)

    theoretical, numerical = tf.test.compute_gradient(first_order, [x, scale, offset])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-6)


def test_second_order_matches_composite_in_tf_function(rng):
    x, scale, offset = make_inputs(rng, (3, 4, 5), 1, "float64")

    def hessian_vector(fn):
        @tf.function
        def run(x, scale, offset):
            with tf.GradientTape() as outer:
                outer.watch([x, scale])
                with tf.GradientTape() as inner:
                    inner.watch([x, scale])
                    y = fn(x, scale, offset, axis=1)[0]
                    loss = tf.reduce_sum(tf.sin(y))
                dx, dscale = inner.gradient(loss, [x, scale])
                g = tf.reduce_sum(dx * dx) + tf.reduce_sum(dscale)
            return outer.gradient(g, [x, scale])
        return run(tf.constant(x), tf.constant(scale), tf.constant(offset))

    for got, want in zip(hessian_vector(tfbn.batch_norm), hessian_vector(composite)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9)


def test_gradient_far_from_zero_keeps_precision():
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((32, 8, 8, 16))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    scale = np.ones(16, np.float32)
    dx, dscale, _ = grads(tfbn.batch_norm, x, scale, np.zeros(16, np.float32), dy)
    dx_ref, dscale_ref, _ = ref.backward(dy, x, scale)
    assert np.abs(dx.numpy() - dx_ref).max() <= 1e-4
    assert np.abs(dscale.numpy() - dscale_ref).max() <= 1e-2  # sum over 2048 values


def test_second_order_gradients_of_an_empty_batch_are_zero():
    x, scale = tf.zeros([0, 3]), tf.ones([3])
    with tf.GradientTape() as outer:
        outer.watch([x, scale])
        with tf.GradientTape() as inner:
            inner.watch([x, scale])
            y, _, _ = tfbn.batch_norm(x, scale)
            loss = tf.reduce_sum(y)
        gx, gs = inner.gradient(loss, [x, scale])
        total = tf.reduce_sum(gs * gs) + tf.reduce_sum(gx)
    np.testing.assert_array_equal(outer.gradient(total, scale), np.zeros(3))
