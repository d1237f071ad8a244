"""The TensorFlow ops on a GPU (`tf.device('/GPU:0')`) against float64 NumPy math: the
fused op's forward and gradient in every dtype and both layouts, the epilogue, and the
layer's split path (renorm, masks). Skips only where TensorFlow sees no GPU; where it sees
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
from test_ops import DTYPES, make_inputs, param_np

DEVICE = os.environ.get("TFBN_TEST_DEVICE", "/GPU:0")
ON_GPU = "GPU" in DEVICE.upper()

pytestmark = pytest.mark.skipif(ON_GPU and not tf.config.list_physical_devices("GPU"),
                                reason="TensorFlow sees no GPU")

LAYOUTS = [((8, 6, 5, 16), -1), ((8, 16, 6, 5), 1), ((64, 24), -1)]  # NHWC, NCHW, [N, C]


def on_device(fn, *args):
    with tf.device(DEVICE):
        return fn(*[tf.identity(tf.constant(a)) for a in args])


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
