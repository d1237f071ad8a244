"""Batch renormalization and masks on the split kernels: the weighted ops against a float64
NumPy reference, the layer against Keras' own BatchNormalization, numerical gradients,
determinism and argument errors."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference
import tfbn
from tfbn import split
from tfbn._library import ops as _ops

NO_WEIGHTS = tf.zeros([0])


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


# ---- float64 NumPy reference of the weighted statistics and gradient. ----

def weighted_moments(x, w, axis):
    """count (weight sum), weighted mean, M2 per channel; w has x's shape without axis."""
    x3 = reference.as3d(np.asarray(x, np.float64), axis)
    w3 = np.asarray(w, np.float64).reshape(x3.shape[0], 1, x3.shape[2])
    count = w3.sum()
    mean = (w3 * x3).sum(axis=(0, 2)) / count
    m2 = (w3 * (x3 - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    return np.full(x3.shape[1], count), mean, m2


def weighted_backward(dy, x, w, scale, axis, epsilon):
    """(dx, dscale, doffset) of y = (x - mean_w) * rsqrt(var_w + eps) * scale + offset."""
    x3 = reference.as3d(np.asarray(x, np.float64), axis)
    dy3 = reference.as3d(np.asarray(dy, np.float64), axis)
    w3 = np.asarray(w, np.float64).reshape(x3.shape[0], 1, x3.shape[2])
    count, mean, m2 = weighted_moments(x, w, axis)
    r = 1.0 / np.sqrt(m2 / count + reference.op_epsilon(epsilon))
    col = lambda v: v[None, :, None]  # noqa: E731
    xhat = (x3 - col(mean)) * col(r)
    s1, s2 = dy3.sum(axis=(0, 2)), (dy3 * xhat).sum(axis=(0, 2))
    dx3 = col(scale * r) * (dy3 - w3 * col(s1 / count) - w3 * xhat * col(s2 / count))
    return dx3.reshape(np.shape(x)), s2, s1


def positions_shape(shape, axis):
    return tuple(d for i, d in enumerate(shape) if i != axis % len(shape))


LAYOUTS = [((64, 6, 6, 5), -1), ((64, 5, 6, 6), 1), ((300, 7), -1), ((4, 3, 5, 33), 1),
           ((3, 20, 1030), -1), ((2, 600, 700), 1)]  # channels (elements) over 512: segments


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["mask", "real"])
def test_weighted_statistics_match_float64_far_from_zero(shape, axis, dtype, kind, rng):
    x = (1e4 + rng.normal(0.0, 1.0, shape)).astype(dtype)
    pshape = positions_shape(shape, axis)
    w = (rng.random(pshape) > 0.4).astype(np.float32)
    if kind == "real":
        w *= rng.uniform(0.0, 3.0, pshape).astype(np.float32)
    w.flat[0] = 0.0  # the first position has no weight: the shift sample comes later
    partial = _ops.tfbn_batch_norm_stats(x, w, axis=axis).numpy()
    count, mean, m2 = weighted_moments(x, w, axis)
    tol = 1e-13 if dtype == "float64" else 1e-9  # d = x - shift sample: float sums suffice
    np.testing.assert_allclose(partial[0], count, rtol=1e-14)
    np.testing.assert_allclose(partial[1], mean, rtol=tol)
    np.testing.assert_allclose(partial[2], m2, rtol=1e-6 if dtype == "float32" else 1e-10)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape,axis", [((64, 6, 6, 5), -1), ((16, 5, 6, 6), 1)])
def test_weighted_statistics_of_half_types_match_float64(dtype, shape, axis, rng):
    x = tf.cast(rng.normal(50.0, 4.0, shape), dtype)
    w = (rng.random(positions_shape(shape, axis)) > 0.4).astype(np.float32)
    partial = _ops.tfbn_batch_norm_stats(x, w, axis=axis).numpy()
    count, mean, m2 = weighted_moments(tf.cast(x, tf.float64).numpy(), w, axis)  # same values
    np.testing.assert_array_equal(partial[0], count)
    np.testing.assert_allclose(partial[1], mean, rtol=1e-9)
    np.testing.assert_allclose(partial[2], m2, rtol=1e-6)


def test_weights_of_one_give_the_unweighted_statistics(rng):
    x = rng.normal(3.0, 2.0, (50, 4, 4, 6)).astype(np.float64)
    ones = np.ones((50, 4, 4), np.float32)
    got = _ops.tfbn_batch_norm_stats(x, ones).numpy()
    want = _ops.tfbn_batch_norm_stats(x, NO_WEIGHTS).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_masked_values_never_reach_the_statistics(rng):
    x = rng.normal(size=(20, 3, 4)).astype(np.float32)
    w = np.ones((20, 3), np.float32)
    w[::3] = 0.0
    x[::3] = np.nan  # masked rows (channels-last)
    x[1, 1] = np.inf
    w[1, 1] = 0.0
    partial = _ops.tfbn_batch_norm_stats(x, w).numpy()
    assert np.all(np.isfinite(partial))
    xt = np.ascontiguousarray(np.transpose(x, (0, 2, 1)))  # the same, planar
    np.testing.assert_allclose(_ops.tfbn_batch_norm_stats(xt, w, axis=1).numpy(), partial,
                               rtol=1e-6, atol=1e-7)  # float sums, another order
    _, mean, m2 = weighted_moments(np.where(w[..., None] > 0, x, 0.0), w, -1)
    np.testing.assert_allclose(partial[1:], [mean, m2], rtol=1e-6, atol=1e-7)


def test_no_weight_gives_zero_partials_and_nan_statistics():
    x = tf.ones([4, 5, 3])
    partial = _ops.tfbn_batch_norm_stats(x, tf.zeros([4, 5]))
    np.testing.assert_array_equal(partial, np.zeros((3, 3)))
    mean, var, _, count = _ops.tfbn_batch_norm_merge_stats(partial, U=tf.float32)
    assert np.all(np.isnan(mean)) and np.all(np.isnan(var)) and np.all(count.numpy() == 0)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weighted_gradient_matches_float64(shape, axis, dtype, rng):
    x = (100.0 + rng.normal(0.0, 2.0, shape)).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    c = shape[axis]
    pdt = tf.float64 if dtype == "float64" else tf.float32
    scale = rng.uniform(0.5, 1.5, c)
    offset = rng.uniform(-1.0, 1.0, c)
    w = (rng.random(positions_shape(shape, axis)) > 0.3).astype(np.float32)
    xt = tf.constant(x)
    s, o = tf.constant(scale, pdt), tf.constant(offset, pdt)
    with tf.GradientTape() as tape:
        tape.watch([xt, s, o])
        y, mean, var = split.split_batch_norm(xt, s, o, axis=axis, epsilon=1e-3, weights=w)
        loss = tf.reduce_sum(y * dy)
    dx, dscale, doffset = tape.gradient(loss, [xt, s, o])
    _, ref_mean, ref_m2 = weighted_moments(x, w, axis)
    ref_var = ref_m2 / w.sum()
    x3 = reference.as3d(x.astype(np.float64), axis)
    ref_y = ((x3 - ref_mean[None, :, None]) / np.sqrt(ref_var + reference.op_epsilon(1e-3))
             [None, :, None] * scale[None, :, None] + offset[None, :, None]).reshape(shape)
    ref_dx, ref_dscale, ref_doffset = weighted_backward(dy, x, w, scale, axis, 1e-3)
    reference.assert_close(mean, ref_mean, dtype, "mean")
    reference.assert_close(var, ref_var, dtype, "variance")
    reference.assert_close(y, ref_y, dtype, "y")
    reference.assert_close(dx, ref_dx, dtype, "dx")
    atol = 1e-8 if dtype == "float64" else 1e-3  # sums over ~1000 float32 terms
    np.testing.assert_allclose(dscale, ref_dscale, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(doffset, ref_doffset, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("shape,axis", [((6, 3, 4), -1), ((5, 3, 2, 3), 1)])
def test_numerical_gradients_of_the_weighted_path(shape, axis, rng):
    """Jacobian of (y, mean, variance) w.r.t. x, scale and offset by finite differences."""
    x = rng.normal(1.0, 2.0, shape)
    c = shape[axis]
    w = rng.uniform(0.0, 2.0, positions_shape(shape, axis)).astype(np.float32)
    w.flat[1] = 0.0
    scale, offset = rng.uniform(0.5, 1.5, c), rng.uniform(-1, 1, c)

    def f(x, s, o):
        y, mean, var = split.split_batch_norm(x, s, o, axis=axis, epsilon=1e-3, weights=w)
        return tf.concat([tf.reshape(y, [-1]), 3.0 * mean, 0.5 * var], axis=0)

    theoretical, numerical = tf.test.compute_gradient(f, [x, scale, offset], delta=1e-6)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-6)


def test_the_layer_runs_the_split_kernels():
    layer = tfbn.BatchNormalization(renorm=True)
    x = tf.random.normal([8, 4, 4, 3])
    mask = tf.ones([8, 4, 4], tf.bool)
    graph = tf.function(lambda x, m: layer(x, training=True, mask=m)).get_concrete_function(
        x, mask).graph
    types = {op.type for op in graph.get_operations()}
    assert {"TfbnBatchNormStats", "TfbnBatchNormApply"} <= types, types
    assert "Mean" not in types and "Sum" not in types, types  # no composite statistics


# ---- The layer against Keras' own BatchNormalization. ----

def twins(input_shape, dtype="float32", **kwargs):
    rng = np.random.default_rng(7)
    if dtype is not None:  # None: the global policy's
        kwargs["dtype"] = dtype
    ours = tfbn.BatchNormalization(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build(input_shape)
    theirs.build(input_shape)
    weights = []
    for v in theirs.weights:  # positive stddevs/variances, near-1 gamma
        name = v.path.split("/")[-1]
        lo, hi = (-0.5, 0.5) if name in ("beta", "moving_mean", "renorm_mean") else (0.5, 1.5)
        weights.append(rng.uniform(lo, hi, v.shape).astype(v.dtype))
    theirs.set_weights(weights)
    ours.set_weights(theirs.get_weights())
    return ours, theirs


def train_steps(layer, xs, masks, cotangent, compiled=False):
    """Per step: output, input gradient, trainable-weight gradients, every weight after."""

    def step(x, mask):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(tf.cast(y, tf.float64) * cotangent)
        grads = tape.gradient(loss, [x] + layer.trainable_weights)
        return [y] + grads

    run = tf.function(step) if compiled else step
    results = []
    for x, mask in zip(xs, masks):
        outs = run(tf.constant(x), None if mask is None else tf.constant(mask))
        results.append([o.numpy() for o in outs] + [w.numpy() for w in layer.weights])
    return results


def assert_same_training(ours, theirs, xs, masks, rtol, atol, compiled=False, skip=()):
    cot = np.random.default_rng(3).normal(size=xs[0].shape)
    got = train_steps(ours, xs, masks, cot, compiled)
    want = train_steps(theirs, xs, masks, cot)
    names = (["y", "dx"] + [f"d{w.path.split('/')[-1]}" for w in theirs.trainable_weights]
             + [w.path.split("/")[-1] for w in theirs.weights])
    for step, (g, w) in enumerate(zip(got, want)):
        for name, a, b in zip(names, g, w):
            if name in skip:
                continue
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol,
                                       err_msg=f"step {step}: {name}")
    return got, want


TOL = {"float32": (2e-5, 2e-5), "float64": (1e-9, 1e-9)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("clipping", [None, {"rmax": 1.2, "rmin": 0.8, "dmax": 0.05}])
@pytest.mark.parametrize("momentum,renorm_momentum", [(0.99, 0.99), (0.9, 0.5), (0.0, 0.8)])
def test_renorm_matches_keras(dtype, clipping, momentum, renorm_momentum):
    shape = (16, 4, 4, 5)
    ours, theirs = twins(shape, dtype, renorm=True, renorm_clipping=clipping,
                         momentum=momentum, renorm_momentum=renorm_momentum)
    rng = np.random.default_rng(11)
    xs = [rng.normal(2.0 * k, 1.0 + k, shape).astype(dtype) for k in range(4)]
    got, _ = assert_same_training(ours, theirs, xs, [None] * 4, *TOL[dtype])
    if clipping:  # the tight bounds bind: a twin with the same weights and no clipping
        unclipped, _ = twins(shape, dtype, renorm=True, renorm_clipping=None,
                             momentum=momentum, renorm_momentum=renorm_momentum)
        cot = np.random.default_rng(3).normal(size=shape)
        free = train_steps(unclipped, xs, [None] * 4, cot)
        assert np.abs(got[-1][0] - free[-1][0]).max() > 1e-2


def test_renorm_matches_keras_channels_first_and_compiled():
    shape = (8, 3, 5, 5)
    ours, theirs = twins(shape, axis=1, renorm=True, momentum=0.8, renorm_momentum=0.7,
                         renorm_clipping={"rmax": 1.5, "dmax": 0.3})
    rng = np.random.default_rng(12)
    xs = [rng.normal(1.0, 2.0, shape).astype(np.float32) for _ in range(3)]
    assert_same_training(ours, theirs, xs, [None] * 3, *TOL["float32"], compiled=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("renorm", [False, True])
def test_mask_matches_keras(dtype, renorm, rng):
    shape = (6, 10, 4)
    ours, theirs = twins(shape, dtype, momentum=0.7, renorm=renorm)
    xs, masks = [], []
    for k in range(3):
        xs.append(rng.normal(3.0, 2.0, shape).astype(dtype))
        mask = rng.random(shape[:-1]) > 0.4
        mask[k] = False  # a row with no unmasked element
        masks.append(mask)
    # Keras divides the masked sums by count + 1e-7: a relative 1e-7 / count apart.
    rtol, atol = (1e-7, 1e-7) if dtype == "float64" else TOL[dtype]
    assert_same_training(ours, theirs, xs, masks, rtol, atol)


def test_float_and_broadcast_masks_match_keras(rng):
    shape = (4, 6, 5, 3)
    ours, theirs = twins(shape, momentum=0.5)
    x = rng.normal(size=shape).astype(np.float32)
    mask = (rng.random((4, 6, 1)) > 0.3).astype(np.float32) * 2.0  # nonzero counts
    assert_same_training(ours, theirs, [x, x], [mask, mask], *TOL["float32"], compiled=True)


@pytest.mark.parametrize("renorm", [False, True])
def test_fully_masked_batch_keeps_the_moving_statistics(renorm, rng):
    shape = (5, 7, 3)
    ours, theirs = twins(shape, renorm=renorm, momentum=0.5)
    before = [w.numpy() for w in ours.non_trainable_weights]
    x = rng.normal(size=shape).astype(np.float32)
    mask = np.zeros(shape[:-1], bool)
    moving = [w.path.split("/")[-1] for w in theirs.non_trainable_weights]
    # Output and gradients as Keras' (mean 0, variance 0); Keras then writes those zeros
    # into its moving statistics, tfbn keeps them.
    assert_same_training(ours, theirs, [x], [mask], *TOL["float32"], skip=moving)
    for w, b in zip(ours.non_trainable_weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


def test_mask_in_inference_is_ignored_as_in_keras(rng):
    ours, theirs = twins((4, 5, 3))
    x = rng.normal(size=(4, 5, 3)).astype(np.float32)
    mask = rng.random((4, 5)) > 0.5
    np.testing.assert_allclose(ours(x, training=False, mask=mask),
                               theirs(x, training=False, mask=mask), rtol=1e-6, atol=1e-6)


def test_mask_with_channels_first_runs_keras_math(rng):
    """Keras broadcasts the mask over the last axis, so with axis=1 each channel has its
    own weights; the layer then runs Keras' implementation and agrees with it."""
    shape = (4, 3, 5, 2)
    ours, theirs = twins(shape, axis=1, momentum=0.5)
    x = rng.normal(size=shape).astype(np.float32)
    mask = rng.random(shape[:-1]) > 0.3
    assert_same_training(ours, theirs, [x], [mask], 1e-6, 1e-6)


def test_mixed_precision_mask_and_renorm_match_keras(rng):
    keras.mixed_precision.set_global_policy("mixed_float16")
    shape = (8, 6, 4)
    ours, theirs = twins(shape, None, renorm=True, momentum=0.6)
    x = rng.normal(size=shape).astype(np.float16)
    mask = rng.random(shape[:-1]) > 0.3
    got = ours(x, training=True, mask=mask)
    want = theirs(x, training=True, mask=mask)
    assert got.dtype == want.dtype == tf.float16
    np.testing.assert_allclose(got.numpy().astype(np.float32),
                               want.numpy().astype(np.float32), rtol=2e-3, atol=2e-3)
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


# ---- Determinism and errors. ----

PROBE = r"""
import hashlib, sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
import tfbn
from tfbn import split
h = hashlib.sha256()
rng = np.random.default_rng(0)
for shape, axis in [((64, 28, 28, 32), -1), ((32, 32, 28, 28), 1), ((8192, 96), -1)]:
    for dtype in (tf.float32, tf.bfloat16, tf.float64):
        x = tf.cast(rng.normal(3.0, 2.0, shape), dtype)
        dy = tf.cast(rng.normal(size=shape), dtype)
        pos = [d for i, d in enumerate(shape) if i != axis % len(shape)]
        w = tf.constant((rng.random(pos) > 0.3).astype(np.float32))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, mean, var = split.split_batch_norm(x, None, None, axis=axis, epsilon=1e-3,
                                                  weights=w)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(dy, tf.float32))
        dx = tape.gradient(loss, x)
        for t in (y, mean, var, dx):
            h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def test_weighted_path_gives_the_same_bits_for_any_thread_count():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    digests = {
        n: subprocess.run([sys.executable, "-c", PROBE, str(n)], check=True, env=env,
                          capture_output=True, text=True, timeout=600).stdout.split()[-1]
        for n in (1, 2, 3)
    }
    assert len(set(digests.values())) == 1, digests


def test_weights_of_the_wrong_shape_are_refused_naming_both_shapes():
    x = tf.zeros([4, 5, 3])
    with pytest.raises(ValueError, match=r"weights must have shape \[4,5\].*got shape \[4,3\]"):
        tf.function(lambda: _ops.tfbn_batch_norm_stats(x, tf.ones([4, 3])))()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"weights must have shape \[4,5\].*got shape \[20\]"):
        _ops.tfbn_batch_norm_stats(x, tf.ones([20]))
    c5, f64 = tf.zeros([5]), tf.zeros([2, 5], tf.float64)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                       match=r"weights must have shape \[4,3\].*channel axis 1"):
        _ops.tfbn_batch_norm_grad_apply(x, x, tf.zeros([0]), c5, c5, tf.zeros([0]), f64, f64,
                                        tf.zeros([5], tf.float64), tf.ones([4, 5]), axis=1)


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_negative_or_non_finite_weights_are_refused(bad):
    w = np.ones([4, 5], np.float32)
    w[2, 3] = bad
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"weights must be finite and non-negative, got weights\[13\]"):
        _ops.tfbn_batch_norm_stats(tf.zeros([4, 5, 3]), w)


def test_a_mask_of_the_wrong_rank_is_refused_as_keras_does():
    layer = tfbn.BatchNormalization()
    with pytest.raises(ValueError, match="one dimension less than the inputs"):
        layer(tf.zeros([4, 5, 3]), training=True, mask=tf.ones([4]))


def test_synchronized_renorm_and_mask_match_one_device_on_the_global_batch():
    """MirroredStrategy over 2 logical CPUs, batch split 9 + 3 with the second slice fully
    masked: the synchronized layer's step equals the single-device step on the whole
    batch (sync_renorm_mask_probe.py, in a fresh process)."""
    probe = os.path.join(os.path.dirname(__file__), "helpers", "sync_renorm_mask_probe.py")
    out = subprocess.run([sys.executable, probe], check=True, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert errors.pop("unsynchronized_y") > 1e-2  # the split does matter
    assert max(errors.values()) < 1e-12, errors


def test_model_fit_with_renorm_and_masking_matches_keras(rng):
    """Keras' training loop (compiled train step, optimizer): a Masking layer feeds the
    mask, renorm corrects the statistics; the trained weights agree with Keras' layer."""
    x = rng.normal(2.0, 3.0, (32, 6, 4)).astype(np.float32)
    x[:, 4:] = 0.0  # padding that Masking removes from the statistics
    y = rng.normal(size=(32, 6, 2)).astype(np.float32)

    def model(cls):
        keras.utils.set_random_seed(5)
        m = keras.Sequential([
            keras.Input((6, 4)), keras.layers.Masking(0.0), keras.layers.Dense(3),
            cls(renorm=True, momentum=0.8, renorm_momentum=0.6,
                renorm_clipping={"rmax": 2.0, "dmax": 1.0}),
            keras.layers.Dense(2)])
        m.compile(keras.optimizers.SGD(0.05), "mse")
        m.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        return m

    ours, theirs = model(tfbn.BatchNormalization), model(keras.layers.BatchNormalization)
    assert isinstance(ours.layers[2], tfbn.BatchNormalization)
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5, err_msg=a.path)


STATS_MEMORY_PROBE = r"""
import resource, sys
import tensorflow as tf
from tfbn._library import ops
n, c = 64, 1 << 18  # 64 MiB of float32, many channels
x = tf.ones([n, c])  # no host copy first: the peak so far is x itself
w = tf.ones([n])
_ = ops.tfbn_batch_norm_stats(x[:2, :8], w[:2]).numpy()  # load and warm up first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_ = ops.tfbn_batch_norm_stats(x, w).numpy()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_weighted_statistics_of_many_channels_take_no_large_temporaries():
    """The per-block partial sums of a wide channels-last x stay small next to x (64 MiB
    here; 8 blocks of 3 * C doubles are 48 MiB, 64 blocks would be 384 MiB)."""
    out = subprocess.run([sys.executable, "-c", STATS_MEMORY_PROBE], check=True,
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    growth = int(out.stdout.split()[-1])
    assert growth < 128 << 20, f"peak memory grew by {growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("shape,axis", [((64, 3), -1), ((4, 3, 16), 1)])
@pytest.mark.parametrize("factor", [2.0**100, 2.0**120, 2.0**-100])
def test_statistics_and_gradient_do_not_depend_on_the_weights_scale(shape, axis, factor, rng):
    """Weights of any finite size are accepted: huge ones (whose products with the data
    would overflow float, and whose sum in the gradient's denominators would leave float's
    normal range) and tiny ones give the statistics and gradient of the same weights at
    scale 1. (Subnormal weights count as 0: TensorFlow's kernels flush denormals.)"""
    x = tf.constant(rng.normal(5.0, 1e4, shape).astype(np.float32))
    dy = tf.constant(rng.normal(size=shape).astype(np.float32))
    w = (rng.integers(32, 128, positions_shape(shape, axis)) / 64.0).astype(np.float32)
    w.flat[3] = 0.0

    def run(weights):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, mean, var = split.split_batch_norm(x, None, None, axis=axis, epsilon=1e-3,
                                                  weights=weights)
            loss = tf.reduce_sum(y * dy)
        partial = _ops.tfbn_batch_norm_stats(x, weights, axis=axis).numpy()
        return partial, [t.numpy() for t in (y, mean, var, tape.gradient(loss, x))]

    scaled = (w.astype(np.float64) * factor).astype(np.float32)
    assert np.array_equal(scaled.astype(np.float64) / factor, w)
    (p1, got), (p0, want) = run(scaled), run(w)
    np.testing.assert_allclose(p1[0], p0[0] * factor, rtol=1e-12)
    np.testing.assert_allclose(p1[1], p0[1], rtol=1e-6)
    np.testing.assert_allclose(p1[2], p0[2] * factor, rtol=1e-5)
    for name, a, b in zip(["y", "mean", "variance", "dx"], got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("renorm,masked", [(True, False), (False, True), (True, True)])
def test_second_order_gradients_match_keras(renorm, masked, rng):
    """A gradient penalty (the gradient of a function of dx) through the layer with renorm
    and/or a mask, as Keras' layer gives it (float64; Keras' masked mean divides by
    count + 1e-7, a relative 1e-8 here)."""
    shape = (6, 5, 3)
    kwargs = dict(renorm=renorm, momentum=0.5)
    if renorm:
        kwargs["renorm_clipping"] = {"rmax": 1.5, "rmin": 0.8, "dmax": 0.4}
    ours, theirs = twins(shape, "float64", **kwargs)
    x = tf.constant(rng.normal(1.0, 2.0, shape))
    cot = tf.constant(rng.normal(size=shape))
    mask = tf.constant(rng.random(shape[:-1]) > 0.3) if masked else None

    def penalty_grads(layer):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = layer(x, training=True, mask=mask)
                loss = tf.reduce_sum(tf.sin(y) * cot)
            dx, *dw = inner.gradient(loss, [x] + layer.trainable_weights)
            penalty = tf.reduce_sum(dx ** 2) + sum(tf.reduce_sum(g ** 3) for g in dw)
        return [g.numpy() for g in outer.gradient(penalty, [x] + layer.trainable_weights)]

    for a, b in zip(penalty_grads(ours), penalty_grads(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
