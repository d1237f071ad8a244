"""The fused epilogue y = activation(BatchNorm(x) + residual): against the float64
composite (BatchNorm, add, activation as separate steps), TensorFlow's autodiff of the
composite, numerical gradients, second order, TensorFlow's conventions at the kinks,
the Keras layer, errors, and the same bits on every instruction set and thread count."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
import tfbn
from test_ops import NP_DTYPES, param_np
from tfbn import _library

ACTIVATIONS = ["identity", "relu", "relu6", "silu"]
# NHWC (a part-filled vector), NHWC (a whole tile + a vector), NCHW, small inner, [N, C]
LAYOUTS = [
    ((4, 5, 6, 8), -1),
    ((3, 4, 4, 80), -1),
    ((4, 8, 5, 6), 1),
    ((8, 6, 3), 1),
    ((37, 3), -1),
]
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "identity": (), "silu": ()}


def act_np(z, activation):
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "relu6":
        return np.minimum(np.maximum(z, 0.0), 6.0)
    if activation == "silu":
        return z / (1.0 + np.exp(-z))
    return z


def act_grad_np(dy, z, activation):
    if activation == "relu":
        return np.where(z > 0, dy, 0.0)
    if activation == "relu6":
        return np.where((z > 0) & (z < 6), dy, 0.0)
    if activation == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return dy * s * (1 + z * (1 - s))
    return dy


def reference(x, scale, offset, residual, dy, activation, axis, training, mean, var):
    """Float64 composite: (y, dx, dscale, doffset, dresidual) on the same input values."""
    z, mean_t, var_t = ref.forward(x, scale, offset, mean, var, axis=axis, training=training)
    if residual is not None:
        z = z + np.asarray(residual, np.float64)
    dz = act_grad_np(np.asarray(dy, np.float64), z, activation)
    dx, dscale, doffset = ref.backward(dz, x, scale, mean_t, var_t, axis=axis,
                                       training=training)
    return act_np(z, activation), dx, dscale, doffset, dz, z


def make_case(rng, shape, axis, dtype_name, with_residual, activation, training):
    """Inputs as NumPy arrays of the op's dtypes. dy is zero where z lies so close to a
    kink that the rounding of a half-precision z could put it on the other side: there
    the derivative is not defined by the data, and elsewhere the check stays exact."""
    t = NP_DTYPES[dtype_name]
    p = param_np(dtype_name)
    c = shape[axis]
    x = (0.5 + 2.0 * rng.standard_normal(shape)).astype(t)
    scale = rng.uniform(0.5, 2.5, c).astype(p)
    offset = rng.uniform(-1.0, 2.0, c).astype(p)
    residual = rng.standard_normal(shape).astype(t) if with_residual else None
    mean = rng.standard_normal(c).astype(p)
    var = rng.uniform(0.5, 2.0, c).astype(p)
    dy = rng.standard_normal(shape).astype(t)
    z = reference(x, scale, offset, residual, dy, "identity", axis, training, mean, var)[5]
    near = np.zeros(shape, bool)
    margin = 1e-9 if dtype_name == "float64" else 0.05
    for k in KINKS[activation]:
        near |= np.abs(z - k) < margin
    dy = np.where(near, 0, dy).astype(t)
    return x, scale, offset, residual, mean, var, dy


def run_tfbn(x, scale, offset, residual, dy, activation, axis, training, mean, var):
    tensors = [tf.constant(v) for v in (x, scale, offset)]
    res = None if residual is None else tf.constant(residual)
    stats = {} if training else {"mean": tf.constant(mean), "variance": tf.constant(var)}
    with tf.GradientTape() as tape:
        tape.watch(tensors + ([res] if res is not None else []))
        y, _, _ = tfbn.batch_norm(*tensors, axis=axis, training=training, residual=res,
                                  activation=activation, **stats)
    sources = tensors + ([res] if res is not None else [])
    grads = tape.gradient(y, sources, output_gradients=tf.constant(dy))
    return y, grads


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_float64_composite(rng, activation, with_residual, training, shape, axis,
                                   dtype_name):
    x, scale, offset, residual, mean, var, dy = make_case(
        rng, shape, axis, dtype_name, with_residual, activation, training)
    y, grads = run_tfbn(x, scale, offset, residual, dy, activation, axis, training, mean, var)
    y_ref, dx_ref, dscale_ref, doffset_ref, dres_ref, _ = reference(
        x, scale, offset, residual, dy, activation, axis, training, mean, var)
    assert y.dtype == tf.as_dtype(NP_DTYPES[dtype_name])
    ref.assert_close(y, y_ref, dtype_name, "y")
    ref.assert_close(grads[0], dx_ref, dtype_name, "dx")
    # The sums are of dz computed in float32 (float64 for float64), added in double.
    tol = 1e-9 if dtype_name == "float64" else 2e-5
    for got, want, what in ((grads[1], dscale_ref, "dscale"), (grads[2], doffset_ref, "doffset")):
        bound = tol * max(1.0, np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=tol, atol=bound, err_msg=what)
    if with_residual:
        ref.assert_close(grads[3], dres_ref, dtype_name, "dresidual")


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_half_precision_dx_where_dz_nearly_cancels(rng, dtype_name, axis):
    """silu on z around 2 to 3 with dy = 1 and a narrow batch: dz varies little around its
    mean, and dx is made of what remains after the mean is taken out, scaled by a large
    1/std. dx must come from dz in float32, not from dz rounded to half precision (the
    dresidual output's dtype), or its error grows far past the half-precision tolerance."""
    shape = (64, 8, 4) if axis == 1 else (256, 8)
    t = NP_DTYPES[dtype_name]
    for std, offset_value in ((0.01, 2.0), (0.03, 3.0)):
        x = (5.0 + std * rng.standard_normal(shape)).astype(t)
        scale = np.ones(8, np.float32)
        offset = np.full(8, offset_value, np.float32)
        residual = (0.01 * rng.standard_normal(shape)).astype(t)
        dy = np.ones(shape, t)
        y, grads = run_tfbn(x, scale, offset, residual, dy, "silu", axis, True, None, None)
        y_ref, dx_ref, _, _, dres_ref, _ = reference(x, scale, offset, residual, dy, "silu",
                                                     axis, True, None, None)
        ref.assert_close(y, y_ref, dtype_name, "y")
        ref.assert_close(grads[0], dx_ref, dtype_name, "dx")
        ref.assert_close(grads[3], dres_ref, dtype_name, "dresidual")


def composite_tf(x, scale, offset, residual, activation, axis, training, mean=None, var=None):
    """BatchNorm, add and activation as separate TensorFlow ops (autodiff reference)."""
    rank = x.shape.rank
    axis %= rank
    axes = [d for d in range(rank) if d != axis]
    bshape = [1] * rank
    bshape[axis] = -1
    if training:  # not tf.nn.moments: its stop_gradient changes second derivatives
        mean = tf.reduce_mean(x, axes)
        var = tf.reduce_mean(tf.square(x - tf.reshape(mean, bshape)), axes)
    r = tf.math.rsqrt(var + ref.op_epsilon(1e-3))
    z = (x - tf.reshape(mean, bshape)) * tf.reshape(r * scale, bshape) + tf.reshape(offset,
                                                                                    bshape)
    if residual is not None:
        z = z + residual
    return tfbn.ops.apply_activation(z, activation)


@pytest.mark.parametrize("shape,axis", [((4, 5, 6, 8), -1), ((4, 8, 5, 6), 1), ((37, 3), -1)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_autodiff_of_composite(rng, activation, training, shape, axis):
    """First and second order, all four inputs, against tf.GradientTape over the composite
    (TensorFlow's own relu/relu6/silu gradients) in float64."""
    x, scale, offset, residual, mean, var, dy = make_case(rng, shape, axis, "float64", True,
                                                          activation, training)
    x, scale, offset, residual, dy = (tf.constant(v) for v in (x, scale, offset, residual, dy))
    mean, var = tf.constant(mean), tf.constant(var)
    w = tf.constant(rng.standard_normal(shape))
    sources = [x, scale, offset, residual]

    def first_and_second(fn):
        with tf.GradientTape() as outer:
            outer.watch(sources + [dy])
            with tf.GradientTape() as inner:
                inner.watch(sources)
                y = fn()
            g = inner.gradient(y, sources, output_gradients=dy)
            # A scalar of every first-order gradient, weighted so nothing cancels.
            loss = tf.reduce_sum(g[0] * w) + tf.reduce_sum(g[3] * w * w)
            loss += tf.reduce_sum(g[1] * g[1]) + tf.reduce_sum(g[2] * tf.range(
                1.0, 1.0 + g[2].shape[0], dtype=tf.float64))
        return y, g, outer.gradient(loss, sources + [dy])

    stats = {} if training else {"mean": mean, "variance": var}
    got = first_and_second(lambda: tfbn.batch_norm(
        x, scale, offset, axis=axis, training=training, residual=residual,
        activation=activation, **stats)[0])
    want = first_and_second(lambda: composite_tf(x, scale, offset, residual, activation, axis,
                                                 training, mean, var))
    names = ["x", "scale", "offset", "residual"]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-9, err_msg="y")
    for a, b, n in zip(got[1], want[1], names):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-8, err_msg="d" + n)
    for a, b, n in zip(got[2], want[2], names + ["dy"]):
        if a is None and b is None:
            continue
        # None (not connected) and zeros are the same second derivative
        a = np.zeros_like(b) if a is None else a
        b = np.zeros_like(a) if b is None else b
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-7, err_msg="second order " + n)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_numerical_gradients(rng, activation, training):
    shape, axis = (5, 3, 2), 1
    x, scale, offset, residual, mean, var, _ = make_case(rng, shape, axis, "float64", True,
                                                         activation, training)
    stats = {} if training else {"mean": tf.constant(mean), "variance": tf.constant(var)}

    def f(x, scale, offset, residual):
        y = tfbn.batch_norm(x, scale, offset, axis=axis, training=training, residual=residual,
                            activation=activation, **stats)[0]
        return y

    z = reference(x, scale, offset, residual, np.zeros(shape), "identity", axis, training, mean,
                  var)[5]
    for k in KINKS[activation]:  # finite differences must not straddle a kink
        assume = np.abs(z - k).min() > 1e-3
        if not assume:
            pytest.skip("random case too close to a kink for finite differences")
    theoretical, numerical = tf.test.compute_gradient(f, [x, scale, offset, residual],
                                                      delta=1e-6)
    for a, b in zip(theoretical, numerical):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype_name", ["float32", "float64", "bfloat16"])
def test_kinks_follow_tensorflow(dtype_name):
    """z exactly 0 and 6 (scale 0 makes z = offset + residual exactly): relu and relu6 give
    TensorFlow's values and gradients (zero at the kink)."""
    t = NP_DTYPES[dtype_name]
    p = param_np(dtype_name)
    residual = np.array([[-1.0, 0.0, 3.0, 6.0, 7.0, -0.0]], t).repeat(3, axis=0).T.copy()
    x = np.random.default_rng(0).standard_normal(residual.shape).astype(t)
    scale, offset = np.zeros(3, p), np.zeros(3, p)
    mean, var = np.zeros(3, p), np.ones(3, p)
    dy = np.full(residual.shape, 2.0, t)
    for activation, fn in (("relu", tf.nn.relu), ("relu6", tf.nn.relu6)):
        for training in (False, True):
            y, grads = run_tfbn(x, scale, offset, residual, dy, activation, -1, training, mean,
                                var)
            r = tf.constant(residual)
            with tf.GradientTape() as tape:
                tape.watch(r)
                want = fn(r)
            np.testing.assert_array_equal(np.asarray(y, np.float64),
                                          np.asarray(want, np.float64))
            want_dr = tape.gradient(want, r, output_gradients=tf.constant(dy))
            np.testing.assert_array_equal(np.asarray(grads[3], np.float64),
                                          np.asarray(want_dr, np.float64))
            assert np.all(np.asarray(grads[0], np.float64) == 0)  # scale 0: dx = 0


def test_silu_accuracy_over_a_wide_range():
    """silu's exp is a polynomial approximation: within a few ulp of float64 math over the
    whole range, tails included, and finite where the float64 result is."""
    z = np.concatenate([np.linspace(-100, 100, 20001), [-1e-30, 0.0, 1e-30]])
    for dtype, ulps in ((np.float32, 4), (np.float64, 4)):
        zz = z.astype(dtype)[:, None]
        c = np.ones(1, param_np("float64" if dtype == np.float64 else "float32"))
        y, _, _ = tfbn.batch_norm(np.zeros_like(zz), c * 0, c * 0, c * 0, c, training=False,
                                  residual=zz, activation="silu")
        want = act_np(zz.astype(np.float64), "silu")
        err = np.abs(np.asarray(y, np.float64) - want)
        tiny = np.finfo(dtype).tiny
        assert np.all(err <= ulps * np.finfo(dtype).eps * np.abs(want) + 1e3 * tiny), (
            dtype, float(err.max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_of_huge_values(dtype):
    """Beyond exp's range sigmoid(z) is 0 or 1, so silu(z) is -0 or z and its derivative 0
    or 1, without relying on denormals being flushed to zero (the NumPy module does not)."""
    top = np.finfo(dtype).max
    z = np.array([-top, -1e30, -1e20, -1e6, -1e3, 1e3, 1e20, top], dtype)[:, None]
    p = np.ones(1, param_np("float64" if dtype == np.float64 else "float32"))
    dy = np.ones_like(z)
    want_y = np.where(z < 0, 0.0, z)
    want_dz = np.where(z < 0, 0.0, 1.0)
    x = np.zeros_like(z)
    from tfbn import _core as core
    y = core.batch_norm_forward(x, p, p * 0, p * 0, p, training=False, residual=z,
                                activation="silu")[0]
    dz = core.batch_norm_backward(dy, x, p, p * 0, p, training=False, offset=p * 0,
                                  residual=z, activation="silu")[-1]
    y_tf, _, _ = tfbn.batch_norm(x, p, p * 0, p * 0, p, training=False, residual=z,
                                 activation="silu")
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(dz, want_dz)
    np.testing.assert_array_equal(y_tf, want_y)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9), c=st.integers(1, 70), inner=st.integers(1, 20),
    activation=st.sampled_from(ACTIVATIONS), channels_last=st.booleans(),
    training=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_any_shape_float32(n, c, inner, activation, channels_last, training, seed):
    """Odd sizes: every head/tail/tile boundary of the kernels, float32 vs float64."""
    rng = np.random.default_rng(seed)
    shape, axis = ((n, inner, c), -1) if channels_last else ((n, c, inner), 1)
    x, scale, offset, residual, mean, var, dy = make_case(rng, shape, axis, "float32", True,
                                                          activation, training)
    y, grads = run_tfbn(x, scale, offset, residual, dy, activation, axis, training, mean, var)
    y_ref, dx_ref, _, _, dres_ref, _ = reference(x, scale, offset, residual, dy, activation,
                                                 axis, training, mean, var)
    ref.assert_close(y, y_ref, "float32", "y")
    if n * inner > 1 or not training:  # one element per channel: dx is rounding noise
        ref.assert_close(grads[0], dx_ref, "float32", "dx")
    ref.assert_close(grads[3], dres_ref, "float32", "dresidual")


def test_identity_without_residual_is_the_plain_op(rng):
    x = rng.standard_normal((8, 6, 6, 16)).astype(np.float32)
    plain = tfbn.batch_norm(x)
    for activation in (None, "linear", "identity"):
        same = tfbn.batch_norm(x, activation=activation)
        for a, b in zip(plain, same):
            assert a.numpy().tobytes() == b.numpy().tobytes()


def test_statistics_are_those_of_x(rng):
    x = rng.standard_normal((16, 12)).astype(np.float32)
    residual = (5 + rng.standard_normal((16, 12))).astype(np.float32)
    _, mean, var = tfbn.batch_norm(x, residual=residual, activation="relu")
    _, mean0, var0 = tfbn.batch_norm(x)
    np.testing.assert_array_equal(mean, mean0)
    # the relu path normalizes with the variance as float32 (what the gradient sees)
    np.testing.assert_array_equal(var, var0)


def test_graph_mode_and_unknown_batch(rng):
    x = rng.standard_normal((6, 4, 4, 8)).astype(np.float32)
    residual = rng.standard_normal((6, 4, 4, 8)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 8])] * 2)
    def f(x, r):
        with tf.GradientTape() as tape:
            tape.watch([x, r])
            y = tfbn.batch_norm(x, residual=r, activation="silu")[0]
        return (y,) + tuple(tape.gradient(y, [x, r]))

    got = f(x, residual)
    ones = np.ones(x.shape)  # the tape's default output gradient
    y_ref, dx_ref, _, _, dres_ref, _ = reference(x, None, None, residual, ones, "silu", -1,
                                                 True, None, None)
    for g, want, what in zip(got, (y_ref, dx_ref, dres_ref), ("y", "dx", "dresidual")):
        assert g.shape == x.shape, what
        ref.assert_close(g, want, "float32", what)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_outputs_may_take_over_dead_inputs(rng, activation, with_residual):
    """Inside a graph x, residual and dy are intermediates no one else holds, so the
    kernels may write y, dx and dresidual into their buffers: same bits as eagerly."""
    shape = (6, 4, 4, 24)
    x0, r0, dy0 = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    k = tf.constant(1.5)

    def step(x0, r0, dy0, k):
        x, r, dy = x0 * k, (r0 * k if with_residual else None), dy0 * k
        sources = [x] + ([r] if with_residual else [])
        with tf.GradientTape() as tape:
            tape.watch(sources)
            y = tfbn.batch_norm(x, residual=r, activation=activation)[0]
        return [y] + tape.gradient(y, sources, output_gradients=dy)

    got = tf.function(step)(x0, r0, dy0, k)
    want = step(x0, r0, dy0, k)
    for a, b in zip(got, want):
        assert a.numpy().tobytes() == b.numpy().tobytes()


def test_gradient_keeps_no_preactivation_tensor(rng):
    """The backward's inputs are the forward's inputs and statistics: no full-size
    tensor is produced for it besides y."""
    x = tf.constant(rng.standard_normal((4, 4, 4, 8)).astype(np.float32))
    r = tf.constant(rng.standard_normal((4, 4, 4, 8)).astype(np.float32))

    @tf.function
    def f():
        with tf.GradientTape() as tape:
            tape.watch([x, r])
            y = tfbn.batch_norm(x, residual=r, activation="relu")[0]
        return tape.gradient(y, [x, r])

    graph = f.get_concrete_function().graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("TfbnBatchNorm") == 1 and types.count("TfbnBatchNormGrad") == 1
    assert not {"Relu", "ReluGrad", "AddV2", "Add"} & set(types)
    grad_op = next(op for op in graph.get_operations() if op.type == "TfbnBatchNormGrad")
    full_size = [t for t in grad_op.inputs if t.shape.rank == 4]
    assert len(full_size) == 3  # dy, x, residual


def run_probe(threads, isa=None):
    env = dict(os.environ)
    env.pop("TFBN_CPU_ISA", None)
    if isa:
        env["TFBN_CPU_ISA"] = isa
    probe = os.path.join(os.path.dirname(__file__), "helpers", "epilogue_probe.py")
    out = subprocess.run([sys.executable, probe, str(threads)], check=True, env=env,
                         capture_output=True, text=True, timeout=600)
    return out.stdout.strip().splitlines()[-1]


def test_same_bits_for_every_instruction_set_and_thread_count():
    digests = {(isa, n): run_probe(n, isa)
               for isa, n in (("generic", 2), ("avx2", 2), (None, 2), (None, 1))}
    assert len(set(digests.values())) == 1, digests


# ---- errors ----

X = np.zeros((2, 3, 4, 5), np.float32)


@pytest.mark.parametrize("activation", ["tanh", "ReLU", "", 3, tf.nn.relu])
def test_unknown_activation(activation):
    with pytest.raises(ValueError, match=r"activation must be None, 'linear', 'identity', "
                                         r"'relu', 'relu6', 'silu' or 'swish', got activation="):
        tfbn.batch_norm(X, activation=activation)


def test_residual_dtype_and_shape():
    with pytest.raises(TypeError, match=r"residual must have x's dtype float32, got residual "
                                        r"of dtype float64"):
        tfbn.batch_norm(X, residual=np.zeros(X.shape))
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(2, 3, 4, 5\), "
                                         r"got residual of shape \(2, 3, 4, 1\)"):
        tfbn.batch_norm(X, residual=np.zeros((2, 3, 4, 1), np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 5])] * 2)
    def f(x, r):
        return tfbn.batch_norm(x, residual=r, activation="relu")[0]

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"residual must have the shape of x \[4,5\], got residual of "
                             r"shape \[3,5\]"):
        f(tf.zeros([4, 5]), tf.zeros([3, 5]))


def test_raw_ops_check_the_residual():
    raw = _library.ops
    e = np.zeros(0, np.float32)
    args = (X, e, e, e, e)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match=r"residual must be empty \(\[0\]\) where has_residual is false"):
        raw.tfbn_batch_norm(*args, X)
    with pytest.raises(ValueError, match=r"residual must have the shape of x \[2,3,4,5\]"):
        tf.function(lambda r: raw.tfbn_batch_norm(*args, r, has_residual=True))(e)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"residual must have the shape of x \[2,3,4,5\]"):
        raw.tfbn_batch_norm(*args, e, has_residual=True)
    grad_args = dict(dy=X, x=X, scale=e, offset=e, mean=np.zeros(5, np.float32),
                     variance=np.ones(5, np.float32), mean_lo=e, d_batch_mean=e,
                     d_batch_variance=e)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"residual must have the shape of x \[2,3,4,5\]"):
        raw.tfbn_batch_norm_grad(**grad_args, residual=X[:1], has_residual=True,
                                 activation="relu")
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match=r"offset must be a vector of length C = 5"):
        raw.tfbn_batch_norm_grad(**{**grad_args, "offset": np.ones(4, np.float32)}, residual=X,
                                 has_residual=True, activation="relu")
    dx, _, _, dres = raw.tfbn_batch_norm_grad(**grad_args, residual=e)
    assert dres.shape == (0,) and dx.shape == X.shape


def test_synchronized_without_strategy_is_the_fused_op(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    r = rng.standard_normal((4, 6)).astype(np.float32)
    a = tfbn.batch_norm(x, residual=r, activation="relu6", synchronized=True)[0]
    b = tfbn.batch_norm(x, residual=r, activation="relu6")[0]
    np.testing.assert_array_equal(a, b)


# ---- the Keras layer ----

def test_layer_matches_keras_layer_then_add_and_activation(rng):
    x = rng.standard_normal((8, 5, 5, 6)).astype(np.float32)
    r = rng.standard_normal((8, 5, 5, 6)).astype(np.float32)
    for activation, fn in (("relu", tf.nn.relu), ("silu", tf.nn.silu), ("relu6", tf.nn.relu6)):
        layer = tfbn.BatchNormalization(activation=activation)
        keras_bn = keras.layers.BatchNormalization()
        layer.build(x.shape)
        keras_bn.build(x.shape)
        for training in (True, False):
            got = layer(x, training=training, residual=r)
            want = fn(keras_bn(x, training=training) + r)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.moving_mean, keras_bn.moving_mean, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("option", ["mask", "renorm", "renorm+mask"])
def test_layer_split_path_applies_the_epilogue(rng, option):
    """Renorm and masks train on the split kernels; residual and activation follow them,
    with the same values and gradients as Keras' layer followed by add and activation."""
    x = rng.standard_normal((4, 7, 6)).astype(np.float32) * 2 + 0.5
    r = rng.standard_normal((4, 7, 6)).astype(np.float32)
    mask = rng.random((4, 7)) > 0.3 if "mask" in option else None
    kwargs = dict(renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.3},
                  renorm_momentum=0.5) if "renorm" in option else {}
    layer = tfbn.BatchNormalization(activation="relu", **kwargs)
    keras_bn = keras.layers.BatchNormalization(**kwargs)
    layer.build(x.shape)
    keras_bn.build(x.shape)
    xt, rt = tf.constant(x), tf.constant(r)
    for _ in range(2):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([xt, rt])
            got = layer(xt, training=True, mask=mask, residual=rt)
            want = tf.nn.relu(keras_bn(xt, training=True, mask=mask) + rt)
            loss_got = tf.reduce_sum(got * got)
            loss_want = tf.reduce_sum(want * want)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        for g, w in zip(tape.gradient(loss_got, [xt, rt, layer.gamma, layer.beta]),
                        tape.gradient(loss_want, [xt, rt, keras_bn.gamma, keras_bn.beta])):
            np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(layer.moving_mean, keras_bn.moving_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, keras_bn.moving_variance, rtol=1e-4,
                               atol=1e-5)


def test_layer_config_unchanged_without_epilogue():
    config = tfbn.BatchNormalization().get_config()
    assert "activation" not in config  # the same keys as Keras' layer
    assert tfbn.BatchNormalization.from_config(config).activation is None
    assert tfbn.BatchNormalization(activation="linear").activation is None
    with pytest.raises(ValueError, match="activation must be None"):
        tfbn.BatchNormalization(activation="tanh")


def test_layer_serialization_round_trip(rng, tmp_path):
    inputs = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    outputs = tfbn.BatchNormalization(activation="relu", name="bn")(h, residual=inputs)
    model = keras.Model(inputs, outputs)
    config = model.get_layer("bn").get_config()
    assert config["activation"] == "relu"
    clone = tfbn.BatchNormalization.from_config(config)
    assert clone.activation == "relu"
    x = rng.standard_normal((3, 6, 6, 4)).astype(np.float32)
    model.compile("sgd", "mse")
    model.fit(x, x, epochs=1, batch_size=3, verbose=0)  # moves the statistics
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("bn"), tfbn.BatchNormalization)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=1e-6,
                               atol=1e-6)
    assert np.all(np.asarray(model(x, training=False)) >= 0)


def test_layer_residual_is_cast_to_the_compute_dtype(rng):
    layer = tfbn.BatchNormalization(activation="relu", dtype="mixed_float16")
    x = rng.standard_normal((4, 6)).astype(np.float16)
    r = rng.standard_normal((4, 6)).astype(np.float32)
    y = layer(x, training=True, residual=r)
    assert y.dtype == tf.float16
    y_ref = act_np(ref.forward(x, epsilon=layer.epsilon)[0] + r.astype(np.float16), "relu")
    ref.assert_close(y, y_ref, "float16", "y")


def test_synchronized_epilogue_over_two_replicas():
    """synchronized=True under MirroredStrategy: the global batch's statistics, then the
    add and the activation; the same values and gradients as the fused op on one device."""
    probe = os.path.join(os.path.dirname(__file__), "helpers", "epilogue_sync_probe.py")
    out = subprocess.run([sys.executable, probe], check=True, capture_output=True, text=True,
                         timeout=600)
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-9
