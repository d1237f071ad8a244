"""Bad input: clear errors naming the argument and the values, at graph construction where
shapes are known and at run time otherwise; never a crash."""

import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn._library import ops as raw

X = np.ones((2, 3, 4, 5), np.float32)
F32 = np.float32


def eager_and_traced(fn, *args):
    """Runs fn eagerly and traced with fully unknown shapes (checks at run time)."""
    yield lambda: fn(*args)
    specs = [tf.TensorSpec(None, tf.as_dtype(np.asarray(a).dtype)) for a in args]
    yield lambda: tf.function(fn, input_signature=specs)(*args)


def test_rank_below_two():
    with pytest.raises(ValueError, match=r"x must have rank >= 2.*shape \(5,\)"):
        tfbn.batch_norm(np.ones(5, F32))
    f = tf.function(lambda x: tfbn.batch_norm(x)[0], input_signature=[tf.TensorSpec(None)])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"x must have rank >= 2.*rank 1"):
        f(np.ones(5, F32))


@pytest.mark.parametrize("axis", [4, -5, 17])
def test_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=rf"axis={axis} is out of range for x of rank 4"):
        tfbn.batch_norm(X, axis=axis)
    f = tf.function(lambda x: tfbn.batch_norm(x, axis=axis)[0],
                    input_signature=[tf.TensorSpec(None)])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"axis = {axis} is out of range for x of rank 4"):
        f(X)


@pytest.mark.parametrize("name", ["scale", "offset", "mean", "variance"])
def test_parameter_length_must_match_channels(name):
    good = {k: np.ones(5, F32) for k in ("scale", "offset", "mean", "variance")}
    bad = dict(good, **{name: np.ones(4, F32)})

    def run(x, scale, offset, mean, variance):
        return tfbn.batch_norm(x, scale, offset, mean, variance, training=False)[0]

    pattern = rf"{name} must be a vector of length C = 5 .*got length 4"
    args = (X, bad["scale"], bad["offset"], bad["mean"], bad["variance"])
    # Graph construction with static shapes: the shape function rejects it.
    with pytest.raises(ValueError, match=pattern):
        tf.function(run)(*args)
    # Eager and with unknown shapes: the kernel rejects it at run time.
    for call in eager_and_traced(run, *args):
        with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
            call()


def test_parameter_rank_must_be_one():
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"scale must be a vector.*rank 2"):
        tfbn.batch_norm(X, np.ones((5, 1), F32))


def test_inference_needs_mean_and_variance():
    with pytest.raises(ValueError, match="mean and variance are required when training=False"):
        tfbn.batch_norm(X, training=False)
    with pytest.raises(ValueError, match=r"variance=None"):
        tfbn.batch_norm(X, mean=np.zeros(5, F32), training=False)


@pytest.mark.parametrize("epsilon", [0.0, -1e-3, float("nan"), float("inf"), 1e-60])
def test_epsilon_must_be_positive_and_finite(epsilon):
    with pytest.raises(ValueError, match=r"epsilon must be positive and finite, got epsilon="):
        tfbn.batch_norm(X, epsilon=epsilon)
    # The op itself refuses it too (graph construction and kernel construction).
    args = (X, np.ones(5, F32), np.zeros(5, F32), np.zeros(0, F32), np.zeros(0, F32),
            np.zeros(0, F32))
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match="epsilon must be positive and finite"):
        raw.tfbn_batch_norm(*args, epsilon=epsilon)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match="epsilon must be positive and finite"):
        tf.function(lambda *a: raw.tfbn_batch_norm(*a, epsilon=epsilon))(*args)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64])
def test_unsupported_dtypes(dtype):
    with pytest.raises(TypeError, match=rf"x must be float16, bfloat16, float32 or float64, "
                                        rf"got x of dtype {np.dtype(dtype).name}"):
        tfbn.batch_norm(np.ones((2, 3), dtype))


@pytest.mark.parametrize("x_dtype,p_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                             (np.float16, np.float16)])
def test_mismatched_dtypes(x_dtype, p_dtype):
    want = "float64" if x_dtype == np.float64 else "float32"
    with pytest.raises(TypeError, match=rf"scale must be {want} for x of dtype "
                                        rf"{np.dtype(x_dtype).name}, got scale of dtype "
                                        rf"{np.dtype(p_dtype).name}"):
        tfbn.batch_norm(np.ones((2, 3), x_dtype), np.ones(3, p_dtype))
    # The op's own check, below the Python wrapper.
    args = (np.ones((2, 3), x_dtype), np.ones(3, p_dtype), np.zeros(3, p_dtype),
            np.zeros(0, p_dtype), np.zeros(0, p_dtype), np.zeros(0, x_dtype))
    pattern = (rf"scale, offset, mean and variance must be {want} for x of dtype "
               rf"{np.dtype(x_dtype).name}, got {np.dtype(p_dtype).name}")
    if x_dtype == np.float16 and p_dtype == np.float16:
        # TensorFlow's own check: float16 is not an allowed statistics type.
        pattern = r"(parameter 'scale' has DataType float16 not|attr 'U' of half is not) in"
    with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.NotFoundError, TypeError),
                       match=pattern):
        raw.tfbn_batch_norm(*args)
    with pytest.raises((ValueError, TypeError), match=pattern):
        tf.function(raw.tfbn_batch_norm)(*args)


def test_training_must_be_a_python_bool():
    with pytest.raises(TypeError, match="training must be a Python bool"):
        tfbn.batch_norm(X, training=tf.constant(True))


def test_gradient_op_rejects_mismatched_dy():
    e = np.zeros(0, F32)  # dy, x, scale, offset, mean, variance, mean_lo, residual, ...
    args = (np.ones((2, 4), F32), X, np.ones(5, F32), e, np.zeros(5, F32), np.ones(5, F32),
            e, e, e, e)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"dy has shape \[2,4\] but x has "
                                                             r"shape \[2,3,4,5\]"):
        raw.tfbn_batch_norm_grad(*args)
    with pytest.raises(ValueError, match=r"dy has shape \[2,4\] but x has shape \[2,3,4,5\]"):
        tf.function(raw.tfbn_batch_norm_grad)(*args)


def test_empty_scale_is_not_taken_as_one():
    pattern = r"scale must be a vector of length C = 5 .*got length 0"
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        tfbn.batch_norm(X, np.ones(0, F32))
    with pytest.raises(ValueError, match=pattern):  # graph construction: the shape function
        tf.function(lambda x, s: tfbn.batch_norm(x, s)[0])(X, np.ones(0, F32))


def test_empty_scale_with_a_length_known_only_at_run_time():
    @tf.function(input_signature=[tf.TensorSpec([None, 3]), tf.TensorSpec([None])])
    def f(x, s):
        return tfbn.batch_norm(x, s)[0]

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"scale must be a vector of length C = 3 .*got length 0"):
        f(tf.ones([4, 3]), tf.zeros([0]))
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(f(x, 2 * tf.ones([3])), 2 * f(x, tf.ones([3])), rtol=1e-6)


def test_epsilon_that_overflows_float32():
    with pytest.raises(ValueError, match="epsilon must be positive and finite"):
        tfbn.batch_norm(X, epsilon=1e39)


@pytest.mark.parametrize("shape,axis", [((2, 0, 4), 1), ((4, 0), -1), ((2, 4, 0), -1)])
def test_zero_channels(shape, axis):
    x = tf.zeros(shape)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, mean, var = tfbn.batch_norm(x, axis=axis)
    assert y.shape == shape and mean.shape == (0,) and var.shape == (0,)
    assert tape.gradient(y, x).shape == shape
