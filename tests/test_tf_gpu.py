"""The TensorFlow ops on a GPU (`tf.device('/GPU:0')`) against float64 NumPy math: the
fused op's forward and gradient in every dtype and both layouts, the epilogue, and the
layer's split path (renorm, masks); and the split ops and the epilogue in every dtype
against the same ops on the CPU. Skips only where TensorFlow sees no GPU; where it sees
one, every check runs and a wrong result fails.

TFBN_TEST_DEVICE=/CPU:0 runs the same checks on the CPU (to check this file itself on a
machine without a GPU).
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as ref
import tfbn
from test_ops import DTYPES, NP_DTYPES, make_inputs, param_np
from tfbn._library import ops as raw_ops

DEVICE = os.environ.get("TFBN_TEST_DEVICE", "/GPU:0")
ON_GPU = "GPU" in DEVICE.upper()

pytestmark = pytest.mark.skipif(ON_GPU and not tf.config.list_physical_devices("GPU"),
                                reason="TensorFlow sees no GPU")

LAYOUTS = [((8, 6, 5, 16), -1), ((8, 16, 6, 5), 1), ((64, 24), -1)]  # NHWC, NCHW, [N, C]


def on_device(fn, *args, device=DEVICE):
    with tf.device(device):
        return fn(*[tf.identity(tf.constant(a)) for a in args])


def on_device_and_cpu(fn, *args):
    """fn's outputs on the device and on the CPU, as NumPy arrays; checks that the first
    output was computed on the device."""
    got = on_device(fn, *args)
    assert got[0].device.upper().endswith(DEVICE.strip("/").upper()), got[0].device
    want = on_device(fn, *args, device="/CPU:0")
    return [np.asarray(g) for g in got], [np.asarray(w) for w in want]


def assert_sums_close(got, want, rtol, what):
    """Reductions whose order of additions may differ between devices."""
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-30),
                               err_msg=what)


def test_tensorflow_places_the_fused_op_on_the_device():
    x = np.random.default_rng(0).standard_normal((4, 3, 3, 8)).astype(np.float32)
    y = on_device(lambda x: tfbn.batch_norm(x)[0], x)
    assert y.device.upper().endswith(DEVICE.strip("/").upper()), y.device


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_fused_op_forward_and_gradient(rng, shape, axis, dtype_name, training):
    x, scale, offset = make_inputs(rng, shape, axis, dtype_name, loc=5.0)
    dy = rng.standard_normal(shape).astype(x.dtype)
    p = param_np(dtype_name)
    c = shape[axis]
    mean, var = rng.standard_normal(c).astype(p), rng.uniform(0.5, 2.0, c).astype(p)

    def fn(x, scale, offset, mean, var, dy):
        stats = {} if training else {"mean": mean, "variance": var}
        with tf.GradientTape() as tape:
            tape.watch([x, scale, offset])
            y, m, v = tfbn.batch_norm(x, scale, offset, axis=axis, training=training, **stats)
        return [y, m, v] + tape.gradient(y, [x, scale, offset], output_gradients=dy)

    y, m, v, dx, dscale, doffset = on_device(fn, x, scale, offset, mean, var, dy)
    y_ref, m_ref, v_ref = ref.forward(x, scale, offset, mean, var, axis=axis,
                                      training=training)
    dx_ref, dscale_ref, doffset_ref = ref.backward(dy, x, scale, mean, var, axis=axis,
                                                   training=training)
    stat = "float64" if dtype_name == "float64" else "float32"
    ref.assert_close(y, y_ref, dtype_name, "y")
    ref.assert_close(m, m_ref, stat, "mean")
    ref.assert_close(v, v_ref, stat, "variance")
    ref.assert_close(dx, dx_ref, dtype_name, "dx")
    tol = 1e-9 if dtype_name == "float64" else 1e-4
    for got, want, what in ((dscale, dscale_ref, "dscale"), (doffset, doffset_ref, "doffset")):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(),
                                   err_msg=what)


@pytest.mark.parametrize("activation", ["relu", "relu6", "silu"])
@pytest.mark.parametrize("shape,axis", LAYOUTS[:2])
def test_epilogue_forward_and_gradient(rng, shape, axis, activation):
    from test_epilogue import make_case, reference

    x, scale, offset, residual, mean, var, dy = make_case(rng, shape, axis, "float32", True,
                                                          activation, True)

    def fn(x, scale, offset, residual, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, scale, offset, residual])
            y = tfbn.batch_norm(x, scale, offset, axis=axis, residual=residual,
                                activation=activation)[0]
        return [y] + tape.gradient(y, [x, scale, offset, residual], output_gradients=dy)

    got = on_device(fn, x, scale, offset, residual, dy)
    y_ref, dx_ref, dscale_ref, doffset_ref, dres_ref, _ = reference(
        x, scale, offset, residual, dy, activation, axis, True, mean, var)
    for g, want, what in zip(got, (y_ref, dx_ref), ("y", "dx")):
        ref.assert_close(g, want, "float32", what)
    ref.assert_close(got[4], dres_ref, "float32", "dresidual")
    for g, want, what in zip(got[2:4], (dscale_ref, doffset_ref), ("dscale", "doffset")):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                   err_msg=what)


@pytest.mark.parametrize("option", ["mask", "renorm"])
def test_layer_split_path(rng, option):
    """Masks and renorm train on the statistics | apply ops: a fresh layer (gamma 1,
    beta 0, renorm statistics 0 and 1) against float64 math."""
    shape = (8, 12, 16)
    x = rng.normal(3.0, 2.0, shape).astype(np.float32)
    w = (rng.random(shape[:-1]) > 0.3) if option == "mask" else np.ones(shape[:-1], bool)
    layer = tfbn.BatchNormalization(renorm=option == "renorm")
    layer.build(shape)
    y = on_device(lambda x, m: layer(x, training=True, mask=m), x, w)
    x64, w64 = x.astype(np.float64), w[..., None].astype(np.float64)
    mean = (w64 * x64).sum((0, 1)) / w64.sum((0, 1))
    var = (w64 * (x64 - mean) ** 2).sum((0, 1)) / w64.sum((0, 1))
    eps = ref.op_epsilon(layer.epsilon)
    xhat = (x64 - mean) / np.sqrt(var + eps)
    if option == "renorm":  # r = stddev / 1, d = mean / 1: y = xhat * stddev + mean
        xhat = xhat * np.sqrt(var + eps) + mean
    ref.assert_close(y, xhat, "float32", "y")
    assert isinstance(layer, keras.layers.BatchNormalization)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape,axis", LAYOUTS[:2])
def test_split_ops_match_the_cpu(rng, shape, axis, dtype_name, weighted):
    """Statistics | merge | apply and gradient sums | gradient apply, two identical slices
    merged, on the device against the same ops on the CPU."""
    x, scale, offset = make_inputs(rng, shape, axis, dtype_name, loc=5.0)
    dy = rng.standard_normal(shape).astype(x.dtype)
    positions = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    w = rng.uniform(0.0, 2.0, positions) if weighted else np.zeros(0)
    u = tf.float64 if dtype_name == "float64" else tf.float32

    def fn(x, w, dy, scale, offset):
        w = tf.cast(w, tf.float32)
        partial = raw_ops.tfbn_batch_norm_stats(x, w, axis=axis)
        mean, var, lo, count = raw_ops.tfbn_batch_norm_merge_stats(
            tf.stack([partial, partial]), U=u)
        y = raw_ops.tfbn_batch_norm_apply(x, scale, offset, mean, var, lo, axis=axis)
        sums = raw_ops.tfbn_batch_norm_grad_sums(dy, x, mean, lo, axis=axis)
        dx, dscale, doffset = raw_ops.tfbn_batch_norm_grad_apply(
            dy, x, scale, mean, var, lo, sums, 2.0 * sums, count, w, axis=axis)
        return y, dx, partial, mean, var, lo, count, sums, dscale, doffset

    got, want = on_device_and_cpu(fn, x, w, dy, scale, offset)
    y, dx, partial, mean, var, lo, count, sums, dscale, doffset = got
    stat = "float64" if dtype_name == "float64" else "float32"
    assert_sums_close(partial, want[2], 1e-12, "partial")
    # The mean as its two parts: each part may round differently, their sum may not.
    assert_sums_close(mean + lo.astype(np.float64), want[3] + want[5].astype(np.float64), 1e-12,
                      "mean + mean_lo")
    ref.assert_close(var, want[4], stat, "variance")
    assert_sums_close(count, want[6], 1e-12, "count")
    assert_sums_close(sums, want[7], 1e-9, "sums")
    ref.assert_close(y, want[0], dtype_name, "y")
    ref.assert_close(dx, want[1], dtype_name, "dx")
    assert_sums_close(dscale, want[8], 1e-5, "dscale")
    assert_sums_close(doffset, want[9], 1e-5, "doffset")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("activation,with_residual", [("relu", False), ("identity", True),
                                                      ("silu", True)])
def test_epilogue_matches_the_cpu(rng, dtype_name, activation, with_residual):
    """The epilogue in every dtype, with and without a residual, forward and gradient, on the
    device against the CPU."""
    from test_epilogue import make_case

    shape, axis = LAYOUTS[0]
    x, scale, offset, residual, _, _, dy = make_case(rng, shape, axis, dtype_name,
                                                     with_residual, activation, True)
    if residual is None:
        residual = np.zeros(0, NP_DTYPES[dtype_name])

    def fn(x, scale, offset, residual, dy):
        given = {"residual": residual} if with_residual else {}
        with tf.GradientTape() as tape:
            tape.watch([x, scale, offset, residual])
            y, m, v = tfbn.batch_norm(x, scale, offset, axis=axis, activation=activation,
                                      **given)
        grads = tape.gradient(y, [x, scale, offset] + ([residual] if with_residual else []),
                              output_gradients=dy)
        return [y] + grads + [m, v]

    got, want = on_device_and_cpu(fn, x, scale, offset, residual, dy)
    ref.assert_close(got[0], want[0], dtype_name, "y")
    ref.assert_close(got[1], want[1], dtype_name, "dx")
    if with_residual:
        ref.assert_close(got[4], want[4], dtype_name, "dresidual")
    assert_sums_close(got[2], want[2], 1e-5, "dscale")
    assert_sums_close(got[3], want[3], 1e-5, "doffset")
    for g, w_, what in zip(got[-2:], want[-2:], ("mean", "variance")):
        assert_sums_close(g, w_, 1e-6, what)
