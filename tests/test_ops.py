"""tfbn.batch_norm (the TensorFlow op) against the float64 reference."""

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
import tfbn

DTYPES = ["float16", "bfloat16", "float32", "float64"]
NP_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
             "float64": np.float64}


def param_np(dtype_name):
    return np.float64 if dtype_name == "float64" else np.float32


def make_inputs(rng, shape, axis, dtype_name, loc=0.0, spread=3.0):
    x = (loc + spread * rng.standard_normal(shape)).astype(NP_DTYPES[dtype_name])
    c = shape[axis]
    p = param_np(dtype_name)
    scale = (1.0 + 0.5 * rng.standard_normal(c)).astype(p)
    offset = rng.standard_normal(c).astype(p)
    return x, scale, offset


LAYOUTS = [  # (shape, axis): NHWC, NCHW, NDHWC, NCDHW, [N, C], and a middle axis
    ((4, 5, 6, 7), -1),
    ((4, 7, 5, 6), 1),
    ((2, 3, 4, 5, 6), -1),
    ((2, 6, 3, 4, 5), 1),
    ((33, 17), -1),
    ((3, 4, 5), 1),
    ((5, 3, 1, 2), -2),
]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_training_forward_matches_reference(rng, shape, axis, dtype_name):
    x, scale, offset = make_inputs(rng, shape, axis, dtype_name)
    y, mean, var = tfbn.batch_norm(x, scale, offset, axis=axis, epsilon=1e-3)
    assert y.dtype.name == dtype_name and y.shape == x.shape
    y_ref, mean_ref, var_ref = ref.forward(x, scale, offset, axis=axis, epsilon=1e-3)
    ref.assert_close(y, y_ref, dtype_name, "y")
    stat_dtype = "float64" if dtype_name == "float64" else "float32"
    ref.assert_close(mean, mean_ref, stat_dtype, "batch_mean")
    ref.assert_close(var, var_ref, stat_dtype, "batch_variance")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS[:5])
def test_inference_forward_matches_reference(rng, shape, axis, dtype_name):
    x, scale, offset = make_inputs(rng, shape, axis, dtype_name)
    p = param_np(dtype_name)
    mean = rng.standard_normal(shape[axis]).astype(p)
    var = rng.uniform(0.5, 2.0, shape[axis]).astype(p)
    y, m_out, v_out = tfbn.batch_norm(x, scale, offset, mean, var, axis=axis, training=False)
    y_ref, _, _ = ref.forward(x, scale, offset, mean, var, axis=axis, training=False)
    ref.assert_close(y, y_ref, dtype_name, "y")
    np.testing.assert_array_equal(m_out, mean)
    np.testing.assert_array_equal(v_out, var)


def test_matches_tensorflow_fused_batch_norm(rng):
    x, scale, offset = make_inputs(rng, (8, 6, 6, 16), -1, "float32")
    y, mean, var = tfbn.batch_norm(x, scale, offset, epsilon=1e-3)
    y_tf, mean_tf, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=[], variance=[], epsilon=1e-3, is_training=True
    )
    np.testing.assert_allclose(y, y_tf, atol=1e-4)
    np.testing.assert_allclose(mean, mean_tf, atol=1e-5)
    np.testing.assert_allclose(var, np.var(x.astype(np.float64), axis=(0, 1, 2)), rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    dims=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    axis_seed=st.integers(0, 100),
    dtype_name=st.sampled_from(DTYPES),
    training=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_axes_dtypes(dims, axis_seed, dtype_name, training, seed):
    rng = np.random.default_rng(seed)
    rank = len(dims)
    axis = axis_seed % (2 * rank) - rank  # negative and positive axes
    x, scale, offset = make_inputs(rng, tuple(dims), axis, dtype_name, loc=rng.normal() * 5)
    p = param_np(dtype_name)
    mean = rng.standard_normal(dims[axis]).astype(p)
    var = rng.uniform(0.5, 2.0, dims[axis]).astype(p)
    y, _, _ = tfbn.batch_norm(x, scale, offset, mean, var, axis=axis, training=training)
    y_ref, _, _ = ref.forward(x, scale, offset, mean, var, axis=axis, training=training)
    ref.assert_close(y, y_ref, dtype_name, f"y shape={dims} axis={axis}")


# The README's accuracy claim far from zero: tfbn within 1.4e-6 of float64 math, the anchors
# (TensorFlow's FusedBatchNormV3 and Keras' layer) off by more than 1e-3 on the same values.
FAR_FROM_ZERO_TOL = 2e-6
ANCHOR_MIN_ERROR = 1e-3


def far_from_zero_data():
    rng = np.random.default_rng(0)
    return (1e4 + rng.standard_normal((64, 16, 16, 32))).astype(np.float32)


def test_accuracy_far_from_zero():
    """float32 x = 1e4 + N(0,1): y within 2e-6 of float64 math on the same values."""
    x = far_from_zero_data()
    y, mean, var = tfbn.batch_norm(x)
    y_ref, mean_ref, var_ref = ref.forward(x)
    err = np.abs(y.numpy().astype(np.float64) - y_ref).max()
    assert err <= FAR_FROM_ZERO_TOL, err
    assert np.abs(mean.numpy() - mean_ref).max() <= 1e-3  # float32 rounding of ~1e4
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)
    # Same data in NCHW.
    xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    yt, _, _ = tfbn.batch_norm(xt, axis=1)
    y_ref_t, _, _ = ref.forward(xt, axis=1)
    assert np.abs(yt.numpy().astype(np.float64) - y_ref_t).max() <= FAR_FROM_ZERO_TOL


def test_anchors_lose_precision_far_from_zero():
    """The comparison the accuracy claim makes: on the same data TensorFlow's fused op and
    Keras' layer are off by more than 1e-3 (their float32 statistics cancel)."""
    import keras

    x = far_from_zero_data()
    y_ref, _, _ = ref.forward(x)
    ones, zeros = np.ones(32, np.float32), np.zeros(32, np.float32)
    y_fused = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=ones, offset=zeros, mean=tf.zeros([0]), variance=tf.zeros([0]),
        epsilon=1e-3, is_training=True)[0]
    y_keras = keras.layers.BatchNormalization(epsilon=1e-3)(x, training=True)
    for name, y in (("FusedBatchNormV3", y_fused), ("keras", y_keras)):
        err = np.abs(np.asarray(y, np.float64) - y_ref).max()
        assert err > ANCHOR_MIN_ERROR, (name, err)


def test_defaults_scale_one_offset_zero(rng):
    x, _, _ = make_inputs(rng, (6, 4), -1, "float32")
    y, _, _ = tfbn.batch_norm(x)
    y_ref, _, _ = ref.forward(x)
    ref.assert_close(y, y_ref, "float32")


def test_tf_function_unknown_batch_keeps_static_shapes(rng):
    @tf.function(input_signature=[tf.TensorSpec([None, 5, 5, 3], tf.float32)])
    def f(x):
        y, mean, var = tfbn.batch_norm(x)
        assert y.shape.as_list() == [None, 5, 5, 3]
        assert mean.shape.as_list() == [3] and var.shape.as_list() == [3]
        return y

    x, _, _ = make_inputs(rng, (2, 5, 5, 3), -1, "float32")
    ref.assert_close(f(x), ref.forward(x)[0], "float32")


def test_nchw_static_channels_from_axis():
    @tf.function(input_signature=[tf.TensorSpec([None, 7, None, None], tf.float32)])
    def f(x):
        y, mean, _ = tfbn.batch_norm(x, axis=1)
        assert mean.shape.as_list() == [7]
        return y

    assert f(tf.ones([2, 7, 3, 3])).shape == (2, 7, 3, 3)


def test_empty_batch_gives_empty_y_and_nan_statistics():
    x = np.zeros((0, 4, 4, 3), np.float32)
    y, mean, var = tfbn.batch_norm(x)
    assert y.shape == (0, 4, 4, 3)
    assert np.isnan(mean.numpy()).all() and np.isnan(var.numpy()).all()
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        scale = tf.Variable(np.ones(3, np.float32))
        tape.watch(xt)
        y, _, _ = tfbn.batch_norm(xt, scale)
        loss = tf.reduce_sum(y)
    dx, dscale = tape.gradient(loss, [xt, scale])
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dscale, np.zeros(3))


def test_nan_and_inf_propagate(rng):
    x, _, _ = make_inputs(rng, (4, 3, 3, 2), -1, "float32")
    x[1, 1, 1, 0] = np.nan
    x[2, 0, 0, 1] = np.inf
    y, mean, _ = tfbn.batch_norm(x)
    assert np.isnan(y.numpy()[..., 0]).all() and np.isnan(mean.numpy()[0])
    assert not np.isfinite(y.numpy()[..., 1]).any()
    # Inference: only the bad elements are affected.
    y, _, _ = tfbn.batch_norm(x, mean=np.zeros(2, np.float32), variance=np.ones(2, np.float32),
                              training=False)
    y = y.numpy()
    assert np.isnan(y[1, 1, 1, 0]) and np.isinf(y[2, 0, 0, 1])
    assert np.isfinite(np.delete(y.reshape(-1, 2), [1 * 9 + 4, 2 * 9], axis=0)).all()


def test_single_element_per_channel_has_zero_variance():
    y, mean, var = tfbn.batch_norm(np.array([[1.0, 2.0, 3.0]], np.float32))
    np.testing.assert_array_equal(var, np.zeros(3))
    np.testing.assert_array_equal(y, np.zeros((1, 3)))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape,axis", [((2, 7, 7, 3), -1), ((2, 3, 7, 7), 1)])
def test_negative_zero_offset_keeps_its_sign(shape, axis, dtype_name):
    """Constant channels, scale -1, offset -0.0: y = 0 * -r + (-0.0) = -0.0 in float64, in
    every element and both layouts (the planar walk used to broadcast its parameters as
    0.0 + p, which turned a -0.0 offset into +0.0 for the elements of whole lane vectors)."""
    x = np.full(shape, 1.5, NP_DTYPES[dtype_name])
    c = shape[axis]
    p = param_np(dtype_name)
    y, _, _ = tfbn.batch_norm(x, np.full(c, -1.0, p), np.full(c, -0.0, p), axis=axis)
    y = np.asarray(y, np.float64)
    assert (y == 0).all() and np.signbit(y).all(), f"+0.0 at {np.argwhere(~np.signbit(y))[:4]}"


def test_over_outer_and_inner_blocking_boundaries(rng):
    """Shapes that cut the reduction into many blocks and runs (inner > run length)."""
    for shape, axis in [((3, 2, 70000), 1), ((1, 3, 100003), 1), ((70001, 2), -1)]:
        x = (rng.standard_normal(shape) + 7).astype(np.float32)
        y, mean, var = tfbn.batch_norm(x, axis=axis)
        y_ref, mean_ref, var_ref = ref.forward(x, axis=axis)
        ref.assert_close(y, y_ref, "float32", str(shape))
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-6)
        np.testing.assert_allclose(var, var_ref, rtol=1e-5)


@pytest.mark.parametrize("shape,axis,dtype_name", [
    ((131, 97, 83), 1, "float32"),      # planar, odd plane size: unaligned planes
    ((40000, 37), -1, "float32"),       # channels-last, odd C: unaligned rows
    ((300, 70, 101), 1, "bfloat16"),
    ((2100, 1000), -1, "float16"),
    ((700, 771), 0, "float64"),
])
def test_large_outputs_written_with_streaming_stores(shape, axis, dtype_name):
    """Outputs of 4 MB and more take the non-temporal store path."""
    rng = np.random.default_rng(5)
    x, scale, offset = make_inputs(rng, shape, axis, dtype_name, loc=3.0)
    dy = rng.standard_normal(shape).astype(x.dtype)
    assert x.nbytes >= 4 << 20
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y, _, _ = tfbn.batch_norm(xt, scale, offset, axis=axis)
    dx = tape.gradient(y, xt, output_gradients=tf.constant(dy))
    y_ref, _, _ = ref.forward(x, scale, offset, axis=axis)
    ref.assert_close(y, y_ref, dtype_name, "y")
    dx_ref, _, _ = ref.backward(dy, x, scale, axis=axis)
    ref.assert_close(dx, dx_ref, dtype_name, "dx")


@pytest.mark.parametrize("outlier", [1e2, 1e3, 1e5])
def test_variance_keeps_precision_when_first_sample_is_an_outlier(outlier):
    x = np.random.default_rng(0).normal(size=(200000, 4)).astype(np.float32)
    x[0] = outlier
    _, mean, var = tfbn.batch_norm(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(var, x64.var(0), rtol=2e-6)
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-6, atol=1e-6)
