"""The tfbn ops under XLA (tf.function(jit_compile=True), Keras' jit_compile): every op's
lowering against the op's own kernel and the float64 reference, gradients and
second-order gradients compiled with XLA, and a Keras model trained with
jit_compile=True against the same model trained without.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

import reference as ref
import tfbn
from test_ops import DTYPES, make_inputs, param_np
from tfbn._library import ops as _ops

XLA = tfbn.build_info()["xla"]
needs_xla = pytest.mark.skipif(not XLA, reason="this build has no XLA lowerings")

LAYOUTS = [((4, 5, 6, 8), -1), ((4, 8, 5, 6), 1), ((32, 8), -1)]  # NHWC, NCHW, [N, C]

# Two runs of the same math in a different order (XLA's fusion vs the CPU kernel): y and
# dx agree to a rounding of T; the statistics and sums, kept in U, to a few U roundings.
STAT_TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-6, "bfloat16": 2e-6}


def jit(fn):
    return tf.function(fn, jit_compile=True)


def op_inputs(op_name):
    return [a.name for a in op_def_registry.get(op_name).input_arg]


def op_attrs(op_name):
    return [a.name for a in op_def_registry.get(op_name).attr]


def test_ops_have_the_epilogue_and_the_weights():
    """The lowerings of the epilogue and of the weights below are tested on these inputs:
    an op that lost them must fail here, not skip there."""
    assert "activation" in op_attrs("TfbnBatchNorm")
    assert "residual" in op_inputs("TfbnBatchNorm")
    assert {"offset", "residual"} <= set(op_inputs("TfbnBatchNormGrad"))
    assert "weights" in op_inputs("TfbnBatchNormStats")
    assert "weights" in op_inputs("TfbnBatchNormGradApply")


def empty(dtype):
    return tf.zeros([0], dtype)


def forward_op(x, scale, offset, mean, variance, residual=None, **attrs):
    """TfbnBatchNorm with the inputs this build's op takes (residual where it has one)."""
    args = [x, scale, offset, mean, variance]
    if "residual" in op_inputs("TfbnBatchNorm"):
        args.append(empty(x.dtype) if residual is None else residual)
        if residual is not None:
            attrs["has_residual"] = True
    return _ops.tfbn_batch_norm(*args, **attrs)


def grad_op(dy, x, scale, mean, variance, mean_lo, d_mean, d_var, offset=None,
            residual=None, **attrs):
    """TfbnBatchNormGrad (offset and residual None: empty); returns its 4 outputs."""
    if residual is not None:
        attrs["has_residual"] = True
    offset = empty(mean.dtype) if offset is None else offset
    residual = empty(x.dtype) if residual is None else residual
    return _ops.tfbn_batch_norm_grad(dy, x, scale, offset, mean, variance, mean_lo, residual,
                                     d_mean, d_var, **attrs)


def stats_op(x, weights=None, **attrs):
    args = [x]
    if "weights" in op_inputs("TfbnBatchNormStats"):
        args.append(empty(tf.float32) if weights is None else weights)
    return _ops.tfbn_batch_norm_stats(*args, **attrs)


def grad_apply_op(*args, weights=None, **attrs):
    args = list(args)
    if "weights" in op_inputs("TfbnBatchNormGradApply"):
        args.append(empty(tf.float32) if weights is None else weights)
    return _ops.tfbn_batch_norm_grad_apply(*args, **attrs)


def assert_same(got, want, dtype_name, what, stats=False):
    """XLA result vs the op's kernel: T outputs to T's tolerance, U/float64 outputs
    (statistics, sums) to STAT_TOL relative to their size."""
    got = np.asarray(got).astype(np.float64)
    want = np.asarray(want).astype(np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if stats:
        scale = np.max(np.abs(want[np.isfinite(want)]), initial=1.0)
        np.testing.assert_allclose(got, want, rtol=STAT_TOL[dtype_name],
                                   atol=STAT_TOL[dtype_name] * scale, err_msg=what)
    else:
        ref.assert_close(got, want, dtype_name, what)


def test_build_has_xla():
    """This project's builds must have the lowerings; TFBN_EXPECT_XLA=0 marks a machine
    that cannot have them (no highwayhash/farmhash headers)."""
    if os.environ.get("TFBN_EXPECT_XLA", "1") == "0":
        pytest.skip("TFBN_EXPECT_XLA=0: this machine builds without XLA")
    info = tfbn.build_info()
    assert info["xla"] is True, f"tfbn was built without XLA: {info['xla_reason']}"
    assert tfbn.BatchNormalization().supports_jit is True


LATE_IMPORT = """
import numpy as np, tensorflow as tf
x = tf.constant(np.arange(12.0, dtype=np.float32).reshape(4, 3))
tf.function(lambda x: x * 2, jit_compile=True)(x)  # TensorFlow builds its XLA kernel table
import tfbn
y = tf.function(lambda x: tfbn.batch_norm(x)[0], jit_compile=True)(x)
print(np.abs(y.numpy() - tfbn.batch_norm(x)[0].numpy()).max())
"""


@needs_xla
def test_lowerings_load_after_the_first_xla_compilation():
    """TensorFlow turns XLA lowerings into kernels once, at its first XLA compilation;
    tfbn imported after that still compiles (a fresh process: this one has compiled)."""
    out = subprocess.run([sys.executable, "-c", LATE_IMPORT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split()[-1]) < 1e-6


@needs_xla
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("params", [True, False])
def test_forward_matches_kernel_and_reference(rng, shape, axis, dtype_name, training, params):
    x, scale, offset = make_inputs(rng, shape, axis, dtype_name, loc=2.0)
    p = param_np(dtype_name)
    c = shape[axis]
    mean = rng.standard_normal(c).astype(p)
    var = rng.uniform(0.5, 2.0, c).astype(p)
    pdt = tf.as_dtype(p)
    s = tf.constant(scale) if params else empty(pdt)
    o = tf.constant(offset) if params else empty(pdt)
    m, v = (tf.constant(mean), tf.constant(var)) if not training else (empty(pdt), empty(pdt))
    attrs = dict(axis=axis, is_training=training, has_scale=params, has_offset=params)
    fn = lambda x, s, o, m, v: forward_op(x, s, o, m, v, **attrs)  # noqa: E731
    x = tf.constant(x)
    want = fn(x, s, o, m, v)
    got = jit(fn)(x, s, o, m, v)
    assert_same(got[0], want[0], dtype_name, "y")
    assert_same(got[1], want[1], dtype_name, "batch_mean", stats=True)
    assert_same(got[2], want[2], dtype_name, "batch_variance", stats=True)
    y_ref, mean_ref, var_ref = ref.forward(
        x.numpy(), scale if params else None, offset if params else None, mean, var,
        axis=axis, training=training)
    ref.assert_close(got[0], y_ref, dtype_name, "y vs float64")
    # The lowering's statistics are float64 math rounded once: the mean, carried as
    # batch_mean + mean_lo, keeps float64's precision; the variance is rounded to U.
    full_mean = got[1].numpy().astype(np.float64) + got[3].numpy().astype(np.float64)
    np.testing.assert_allclose(full_mean, mean_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(got[2], var_ref, rtol=1e-13 if dtype_name == "float64" else 1e-7)
    if not training:
        np.testing.assert_array_equal(got[3], np.zeros(c))


@needs_xla
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_grad_op_matches_kernel(rng, shape, axis, dtype_name, training):
    x, scale, _ = make_inputs(rng, shape, axis, dtype_name, loc=-1.0)
    dy = rng.standard_normal(shape).astype(x.dtype)
    p = param_np(dtype_name)
    c = shape[axis]
    x, dy, scale = tf.constant(x), tf.constant(dy), tf.constant(scale)
    if training:
        _, mean, var, mean_lo = forward_op(x, empty(scale.dtype), empty(scale.dtype),
                                           empty(scale.dtype), empty(scale.dtype), axis=axis)
    else:
        mean = tf.constant(rng.standard_normal(c).astype(p))
        var = tf.constant(rng.uniform(0.5, 2.0, c).astype(p))
        mean_lo = empty(scale.dtype)
    d_mean = tf.constant(rng.standard_normal(c).astype(p))
    d_var = tf.constant(rng.standard_normal(c).astype(p))
    fn = lambda *a: grad_op(*a, axis=axis, is_training=training)  # noqa: E731
    for dm, dv, s in ((d_mean, d_var, scale), (empty(scale.dtype), empty(scale.dtype),
                                               empty(scale.dtype))):
        want = fn(dy, x, s, mean, var, mean_lo, dm, dv)
        got = jit(fn)(dy, x, s, mean, var, mean_lo, dm, dv)
        assert_same(got[0], want[0], dtype_name, "dx")
        assert_same(got[1], want[1], dtype_name, "dscale", stats=True)
        assert_same(got[2], want[2], dtype_name, "doffset", stats=True)


def _loss_and_grads(x, scale, offset, w, wm, wv, **kw):
    with tf.GradientTape() as tape:
        tape.watch([x, scale, offset] + [kw[k] for k in ("mean", "variance") if k in kw])
        y, mean, var = tfbn.batch_norm(x, scale, offset, **kw)
        loss = (tf.reduce_sum(tf.cast(y, tf.float32) * w) + tf.reduce_sum(mean * wm)
                + tf.reduce_sum(var * wv))
    sources = [x, scale, offset] + [kw[k] for k in ("mean", "variance") if k in kw]
    return tape.gradient(loss, sources)


@needs_xla
@pytest.mark.parametrize("dtype_name", ["float16", "float32"])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_gradients_under_xla(rng, shape, axis, dtype_name, training):
    """tf.GradientTape inside a jit-compiled function: the registered gradient (raw ops)
    lowers too; gradients reaching the statistics outputs are included."""
    x, scale, offset = make_inputs(rng, shape, axis, dtype_name)
    c = shape[axis]
    w = tf.constant(rng.standard_normal(shape).astype(np.float32))
    wm = tf.constant(rng.standard_normal(c).astype(np.float32))
    wv = tf.constant(rng.standard_normal(c).astype(np.float32))
    x, scale, offset = tf.constant(x), tf.constant(scale), tf.constant(offset)
    kw = dict(axis=axis, training=training)
    if not training:
        kw.update(mean=tf.constant(rng.standard_normal(c).astype(np.float32)),
                  variance=tf.constant(rng.uniform(0.5, 2, c).astype(np.float32)))

    def fn(x, scale, offset, w, wm, wv):
        return _loss_and_grads(x, scale, offset, w, wm, wv, **kw)

    want = fn(x, scale, offset, w, wm, wv)
    got = jit(fn)(x, scale, offset, w, wm, wv)
    assert_same(got[0], want[0], dtype_name, "dx")
    for g, e, name in zip(got[1:], want[1:], ("dscale", "doffset", "dmean", "dvariance")):
        assert_same(g, e, dtype_name, name, stats=True)


@needs_xla
@pytest.mark.parametrize("training", [True, False])
def test_second_order_gradients_under_xla(rng, training):
    shape, axis = (4, 3, 5, 2), 1
    x, scale, offset = (tf.constant(v) for v in make_inputs(rng, shape, axis, "float64"))
    w = tf.constant(rng.standard_normal(shape))
    v = tf.constant(rng.standard_normal(shape))
    kw = dict(axis=axis, training=training)
    if not training:
        kw.update(mean=tf.constant(rng.standard_normal(3)),
                  variance=tf.constant(rng.uniform(0.5, 2, 3)))

    def fn(x, scale, w, v):
        with tf.GradientTape(persistent=True) as outer:
            outer.watch([x, scale])
            with tf.GradientTape() as inner:
                inner.watch([x, scale])
                y = tfbn.batch_norm(x, scale, offset, **kw)[0]
                loss = tf.reduce_sum(y * w)
            dx, dscale = inner.gradient(loss, [x, scale])
            mixed = tf.reduce_sum(dx * v) + tf.reduce_sum(dscale)
        return outer.gradient(mixed, [x, scale])

    want = fn(x, scale, w, v)
    got = jit(fn)(x, scale, w, v)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9)


@needs_xla
def test_far_from_zero_keeps_float32_precision(rng):
    x = (1e4 + rng.standard_normal((64, 4, 4, 16))).astype(np.float32)
    y, mean, var, mean_lo = jit(
        lambda x: forward_op(x, empty(tf.float32), empty(tf.float32), empty(tf.float32),
                             empty(tf.float32)))(tf.constant(x))
    y_ref, mean_ref, var_ref = ref.forward(x)
    err = np.abs(y.numpy() - y_ref).max()
    assert err < 5e-6, err  # the CPU kernel: 1.4e-6; TensorFlow's fused op: 1.8e-2
    # the mean is carried as hi + lo: together they keep float64's mean
    np.testing.assert_allclose(mean.numpy().astype(np.float64) + mean_lo.numpy(), mean_ref,
                               rtol=1e-12)
    assert np.any(mean_lo.numpy() != 0)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)


@needs_xla
def test_tensorflow_fused_op_under_xla_returns_nan_far_from_zero(rng):
    """The comparison the README makes: XLA's own lowering of FusedBatchNormV3 takes
    E[x^2] - E[x]^2 in float32, which goes negative on such data."""
    x = (1e4 + rng.standard_normal((64, 4, 4, 16))).astype(np.float32)
    y = jit(lambda x: tf.raw_ops.FusedBatchNormV3(
        x=x, scale=tf.ones([16]), offset=tf.zeros([16]), mean=empty(tf.float32),
        variance=empty(tf.float32), epsilon=1e-3, is_training=True)[0])(tf.constant(x))
    assert np.isnan(y.numpy()).any()


@needs_xla
def test_gradient_far_from_zero_keeps_precision():
    """The kernels' bounds (test_gradients.py) hold for the lowering too."""
    rng = np.random.default_rng(3)
    x = tf.constant((1e4 + rng.standard_normal((32, 8, 8, 16))).astype(np.float32))
    dy = tf.constant(rng.standard_normal(x.shape).astype(np.float32))
    scale = tf.ones([16])

    @tf.function(jit_compile=True)
    def grads(x, dy, scale):
        with tf.GradientTape() as tape:
            tape.watch([x, scale])
            y = tfbn.batch_norm(x, scale)[0]
        return tape.gradient(y, [x, scale], output_gradients=dy)

    dx, dscale = grads(x, dy, scale)
    dx_ref, dscale_ref, _ = ref.backward(dy.numpy(), x.numpy(), scale.numpy())
    assert np.abs(dx.numpy() - dx_ref).max() <= 1e-4
    assert np.abs(dscale.numpy() - dscale_ref).max() <= 1e-2  # sum over 2048 values


@needs_xla
def test_empty_batch_gives_nan_statistics_and_zero_gradients():
    x = tf.zeros([0, 4])
    e = empty(tf.float32)
    y, mean, var, mean_lo = jit(lambda x: forward_op(x, e, e, e, e))(x)
    assert y.shape == (0, 4)
    assert np.all(np.isnan(mean)) and np.all(np.isnan(var))
    scale = tf.ones([4])
    dx, dscale, doffset = jit(lambda x: grad_op(x, x, scale, mean, var, mean_lo, e, e)[:3])(x)
    assert dx.shape == (0, 4)
    np.testing.assert_array_equal(dscale, np.zeros(4))
    np.testing.assert_array_equal(doffset, np.zeros(4))
    np.testing.assert_array_equal(jit(lambda x: stats_op(x))(x), np.zeros((3, 4)))


@needs_xla
def test_bad_shapes_are_reported_under_xla():
    x = tf.zeros([4, 3])
    fn = jit(lambda x, s: forward_op(x, s, empty(tf.float32), empty(tf.float32),
                                     empty(tf.float32), has_scale=True))
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="scale"):
        fn(x, tf.ones([2]))


def split_ops(parts, dys, scale, offset, axis, pdt, global_rows):
    """The synchronized path's op sequence over `parts` (one process): stats of every
    part, merge, apply, gradient sums, gradient apply."""
    partials = tf.stack([stats_op(p, axis=axis) for p in parts])
    mean, var, residual, count = _ops.tfbn_batch_norm_merge_stats(partials, U=pdt)
    ys = [_ops.tfbn_batch_norm_apply(p, scale, offset, mean, var, residual, axis=axis)
          for p in parts]
    local = [_ops.tfbn_batch_norm_grad_sums(d, p, mean, residual, axis=axis)
             for d, p in zip(dys, parts)]
    total = tf.add_n(local)
    if global_rows == 4:
        total = tf.concat([total, tf.stack([tf.cast(mean, tf.float64) * 0.5,
                                            tf.cast(var, tf.float64) - 1.0])], axis=0)
    grads = [grad_apply_op(d, p, scale, mean, var, residual, own, total, count, axis=axis)
             for d, p, own in zip(dys, parts, local)]
    return [partials, mean, var, residual, count] + ys + [g for gs in grads for g in gs]


@needs_xla
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("global_rows", [2, 4])
def test_split_ops_match_kernels(rng, shape, axis, dtype_name, global_rows):
    x, scale, offset = make_inputs(rng, shape, axis, dtype_name, loc=50.0)
    dy = rng.standard_normal(shape).astype(x.dtype)
    pdt = tf.as_dtype(param_np(dtype_name))
    # three slices of the batch (split on dimension 0), the middle one empty
    cut = shape[0] // 2
    parts = [tf.constant(x[:cut]), tf.constant(x[cut:cut]), tf.constant(x[cut:])]
    dys = [tf.constant(dy[:cut]), tf.constant(dy[cut:cut]), tf.constant(dy[cut:])]
    s, o = tf.constant(scale), tf.constant(offset)

    def fn(parts, dys, s, o):
        return split_ops(parts, dys, s, o, axis, pdt, global_rows)

    want = fn(parts, dys, s, o)
    got = jit(fn)(parts, dys, s, o)
    names = ["partials", "mean", "variance", "mean_residual", "count", "y0", "y1", "y2"]
    names += [f"{n}{i}" for i in range(3) for n in ("dx", "dscale", "doffset")]
    for g, e, name in zip(got, want, names):
        assert_same(g, e, dtype_name, name, stats=not name.startswith(("y", "dx")))
    # and the whole batch's statistics against float64
    _, mean_ref, var_ref = ref.forward(x, axis=axis)
    full_mean = got[1].numpy().astype(np.float64) + got[3].numpy().astype(np.float64)
    np.testing.assert_allclose(full_mean, mean_ref, rtol=1e-13)  # Chan's merge in float64
    np.testing.assert_allclose(got[2], var_ref, rtol=1e-12 if dtype_name == "float64" else 1e-7)


@needs_xla
def test_merge_of_only_empty_parts_is_nan():
    partials = tf.zeros([2, 3, 5], tf.float64)
    mean, var, residual, count = jit(
        lambda p: _ops.tfbn_batch_norm_merge_stats(p, U=tf.float32))(partials)
    assert np.all(np.isnan(mean)) and np.all(np.isnan(var))
    np.testing.assert_array_equal(count, np.zeros(5))


# ---- the epilogue: y = act(BN(x) + residual) ----

def _act(z, activation):
    if activation == "relu":
        return np.maximum(z, 0)
    if activation == "relu6":
        return np.minimum(np.maximum(z, 0), 6)
    if activation == "silu":
        return z / (1 + np.exp(-z))
    return z


@needs_xla
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("activation", ["identity", "relu", "relu6", "silu"])
@pytest.mark.parametrize("has_residual", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_epilogue_matches_kernel_and_reference(rng, dtype_name, activation, has_residual,
                                               training):
    shape, axis = (4, 6, 5, 3), 1
    x, scale, offset = make_inputs(rng, shape, axis, dtype_name)
    residual = (3 * rng.standard_normal(shape)).astype(x.dtype)
    dy = rng.standard_normal(shape).astype(x.dtype)
    p = param_np(dtype_name)
    mean = rng.standard_normal(6).astype(p)
    var = rng.uniform(0.5, 2.0, 6).astype(p)
    pdt = tf.as_dtype(p)
    x, s, o, r, dy = (tf.constant(v) for v in (x, scale, offset, residual, dy))
    m, v = (empty(pdt), empty(pdt)) if training else (tf.constant(mean), tf.constant(var))
    attrs = dict(axis=axis, is_training=training, activation=activation)

    def fn(x, s, o, r, dy):
        res = r if has_residual else None
        y, bm, bv, mean_lo = forward_op(x, s, o, m, v, res, has_scale=True, has_offset=True,
                                        **attrs)
        grads = grad_op(dy, x, s, bm if training else m, bv if training else v,
                        mean_lo if training else empty(pdt), empty(pdt), empty(pdt),
                        offset=o, residual=res, **attrs)
        return [y, bm, bv] + list(grads)

    want = fn(x, s, o, r, dy)
    got = jit(fn)(x, s, o, r, dy)
    names = ["y", "batch_mean", "batch_variance", "dx", "dscale", "doffset", "dresidual"]
    for g, e, name in zip(got, want, names):
        assert_same(g, e, dtype_name, name, stats=name.startswith(("batch", "dscale", "doffset")))
    assert got[6].shape == (x.shape if has_residual else (0,))
    y_ref, _, _ = ref.forward(x.numpy(), scale, offset, mean, var, axis=axis, training=training)
    z_ref = y_ref + (residual.astype(np.float64) if has_residual else 0)
    ref.assert_close(got[0], _act(z_ref, activation), dtype_name, "y vs float64")


# ---- per-element weights (masks) on the split ops ----

@needs_xla
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_weighted_split_ops_match_kernels(rng, shape, axis, dtype_name):
    x, scale, _ = make_inputs(rng, shape, axis, dtype_name, loc=10.0)
    dy = rng.standard_normal(shape).astype(x.dtype)
    wshape = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    w = (rng.uniform(size=wshape) < 0.7).astype(np.float32)
    pdt = tf.as_dtype(param_np(dtype_name))
    x, dy, s, w = tf.constant(x), tf.constant(dy), tf.constant(scale), tf.constant(w)

    def fn(x, dy, s, w):
        partial = stats_op(x, w, axis=axis)
        mean, var, residual, count = _ops.tfbn_batch_norm_merge_stats(partial[None], U=pdt)
        sums = _ops.tfbn_batch_norm_grad_sums(dy, x, mean, residual, axis=axis)
        grads = grad_apply_op(dy, x, s, mean, var, residual, sums, sums, count, weights=w,
                              axis=axis)
        return [partial, mean, var] + list(grads)

    want = fn(x, dy, s, w)
    got = jit(fn)(x, dy, s, w)
    for g, e, name in zip(got, want, ["partial", "mean", "var", "dx", "dscale", "doffset"]):
        assert_same(g, e, dtype_name, name, stats=name != "dx")
    # weighted statistics against float64
    x3 = ref.as3d(x.numpy().astype(np.float64), axis)
    w3 = ref.as3d(np.broadcast_to(np.expand_dims(w.numpy(), axis % len(shape)), shape), axis)
    mean_ref = (w3 * x3).sum(axis=(0, 2)) / w3.sum(axis=(0, 2))
    np.testing.assert_allclose(got[0][1], mean_ref, rtol=1e-12)


# ---- Keras ----

def _digits_like_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(6, 3, padding="same"),
        tfbn.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(4, 3, strides=2),
        tfbn.BatchNormalization(axis=1),  # a non-last axis: [outer, C, inner] with inner > 1
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])


@needs_xla
def test_keras_model_trained_with_jit_compile_matches_without():
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, (96, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, 96)
    models = {}
    for jit_compile in (False, True):
        model = _digits_like_model(7)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit_compile)
        # Keras falls back to jit_compile=False (with a warning) where a layer does not
        # support XLA; tfbn's layer does, so XLA stays on.
        assert model.jit_compile is jit_compile
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        models[jit_compile] = model
    names = [w.path for w in models[False].weights]
    for name, a, b in zip(names, models[False].get_weights(), models[True].get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)
    moving = [w for w in models[True].weights if "moving" in w.path]
    assert len(moving) == 4 and all(np.any(w.numpy() != 0) for w in moving)
    np.testing.assert_allclose(models[True].predict(x, verbose=0),
                               models[False].predict(x, verbose=0), rtol=1e-4, atol=1e-4)


@needs_xla
def test_jit_compile_auto_picks_xla_where_keras_would():
    """Keras' jit_compile="auto" turns XLA on where a GPU is present (never on a CPU-only
    machine, never under tf.distribute) and every layer supports it: a model with tfbn's
    layer now qualifies, so on GPU machines "auto" compiles it with XLA."""
    from keras.src.trainers.trainer import model_supports_jit

    model = _digits_like_model(0)
    assert model_supports_jit(model)
    model.compile(optimizer="sgd", loss="mse")  # jit_compile="auto"
    assert model.jit_compile is bool(tf.config.list_physical_devices("GPU"))
