"""tfbn.BatchNormalization as a drop-in for keras.layers.BatchNormalization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
import tfbn.layers


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def twin_layers(input_shape, **kwargs):
    """A Keras layer and a tfbn layer with the same random weights."""
    rng = np.random.default_rng(7)
    ours = tfbn.BatchNormalization(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build(input_shape)
    theirs.build(input_shape)
    weights = [rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in theirs.get_weights()]
    theirs.set_weights(weights)
    ours.set_weights(theirs.get_weights())
    return ours, theirs


def test_same_constructor_defaults_config_and_weights():
    ours, theirs = tfbn.BatchNormalization(), keras.layers.BatchNormalization()
    config, keras_config = ours.get_config(), theirs.get_config()
    config.pop("name"), keras_config.pop("name")
    assert config == keras_config
    ours.build((None, 4, 4, 3))
    theirs.build((None, 4, 4, 3))
    assert [w.path.split("/")[-1] for w in ours.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    assert [w.trainable for w in ours.weights] == [w.trainable for w in theirs.weights]
    custom = dict(axis=1, momentum=0.9, epsilon=1e-5, center=False, scale=False)
    assert {k: tfbn.BatchNormalization(**custom).get_config()[k] for k in custom} == custom


@pytest.mark.parametrize("shape,axis", [((6, 5, 5, 4), -1), ((6, 4, 5, 5), 1), ((16, 8), -1),
                                        ((3, 4, 4, 4, 3), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_call_matches_keras(shape, axis, training):
    ours, theirs = twin_layers(shape, axis=axis)
    x = np.random.default_rng(0).normal(2.0, 3.0, shape).astype(np.float32)
    y_ours = ours(x, training=training)
    y_theirs = theirs(x, training=training)
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-4, atol=1e-4)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_match_keras():
    shape = (8, 5, 5, 6)
    ours, theirs = twin_layers(shape)
    x = tf.constant(np.random.default_rng(1).normal(1.0, 2.0, shape).astype(np.float32))
    dy = tf.constant(np.random.default_rng(2).normal(size=shape).astype(np.float32))
    results = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * dy)
        results.append(tape.gradient(loss, [x] + layer.trainable_weights))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def small_model(bn_class, seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(8, 3, padding="same"),
        bn_class(),
        keras.layers.ReLU(),
        # NCHW for the axis=1 layer by a transpose, not a channels_first Conv2D, which
        # TensorFlow runs on CPU only through oneDNN (TF_ENABLE_ONEDNN_OPTS=0 has none).
        keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.Permute((3, 1, 2)),
        bn_class(axis=1),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
        bn_class(),
    ])


def test_fit_matches_keras_over_several_steps(monkeypatch):
    calls = []
    real = tfbn.layers.batch_norm
    monkeypatch.setattr(tfbn.layers, "batch_norm",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 6, 6, 3)).astype(np.float32)
    y = rng.normal(size=(64, 3)).astype(np.float32)
    ours = small_model(tfbn.BatchNormalization)
    theirs = small_model(keras.layers.BatchNormalization)
    ours.set_weights(theirs.get_weights())
    for model in (ours, theirs):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")  # defaults otherwise
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert calls, "model.fit did not run the fused op"
    # Keras' "auto": XLA only where a GPU is present (tfbn's layer supports it, test_xla.py)
    assert ours.jit_compile is bool(tf.config.list_physical_devices("GPU"))
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(ours.predict(x, verbose=0), theirs.predict(x, verbose=0),
                               rtol=1e-3, atol=1e-3)


def test_save_and_load(tmp_path):
    model = small_model(tfbn.BatchNormalization)
    x = np.random.default_rng(5).normal(size=(4, 6, 6, 3)).astype(np.float32)
    model(x, training=True)  # move the moving statistics away from their initial values
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.layers[1]) is tfbn.BatchNormalization
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6)


def test_trainable_false_uses_moving_statistics():
    ours, theirs = twin_layers((8, 4))
    ours.trainable = theirs.trainable = False
    x = np.random.default_rng(6).normal(3.0, 2.0, (8, 4)).astype(np.float32)
    before = ours.get_weights()
    np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True), rtol=1e-5,
                               atol=1e-5)
    for a, b in zip(before, ours.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_runs_natively(policy):
    keras.mixed_precision.set_global_policy(policy)
    ours, theirs = twin_layers((8, 4, 4, 6))
    x = np.random.default_rng(8).normal(size=(8, 4, 4, 6)).astype(np.float32)
    y = ours(x, training=True)
    assert y.dtype == ours.compute_dtype
    assert all(w.dtype == "float32" for w in ours.weights)
    tol = 1e-2 if policy == "mixed_float16" else 5e-2
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(theirs(x, training=True), np.float32), atol=tol)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    # The op runs on the half-precision tensor itself: no float32 copy of the input.
    half = tf.float16 if policy == "mixed_float16" else tf.bfloat16
    graph = tf.function(lambda x: ours(x, training=True)).get_concrete_function(
        tf.TensorSpec((8, 4, 4, 6), half)).graph
    bn_ops = [op for op in graph.get_operations() if op.type == "TfbnBatchNorm"]
    assert len(bn_ops) == 1 and bn_ops[0].get_attr("T") == half
    casts = [op for op in graph.get_operations()
             if op.type == "Cast" and op.outputs[0].shape.rank == 4]
    assert not casts, [op.name for op in casts]


def test_empty_batch_leaves_moving_statistics_unchanged():
    ours, _ = twin_layers((2, 3, 3, 4))
    before = ours.get_weights()
    y = ours(np.zeros((0, 3, 3, 4), np.float32), training=True)
    assert y.shape == (0, 3, 3, 4)
    for a, b in zip(before, ours.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_non_finite_channel_keeps_its_moving_statistics():
    ours, theirs = twin_layers((4, 3))
    x = np.random.default_rng(9).normal(size=(4, 3)).astype(np.float32)
    x[0, 1] = np.nan
    before = ours.get_weights()
    ours(x, training=True)
    theirs(x, training=True)
    after = ours.get_weights()
    for i in (2, 3):  # moving_mean, moving_variance
        assert np.isfinite(after[i]).all()
        np.testing.assert_array_equal(after[i][1], before[i][1])
        np.testing.assert_allclose(after[i][[0, 2]], theirs.get_weights()[i][[0, 2]], rtol=1e-5)


# The op types the layer's training paths run: the fused op, and the split path's
# statistics and apply ops (renorm, masks).
FUSED_OP, STATS_OP, APPLY_OP = "TfbnBatchNorm", "TfbnBatchNormStats", "TfbnBatchNormApply"


def op_types(layer, x, mask=None):
    fn = tf.function(lambda x: layer(x, training=True, mask=mask))
    return {op.type for op in fn.get_concrete_function(tf.constant(x)).graph.get_operations()}


@pytest.mark.parametrize("kwargs,kernels", [
    (dict(renorm=True), {STATS_OP, APPLY_OP}),
    (dict(synchronized=True), {FUSED_OP}),  # outside a strategy: the one-device op
])
def test_renorm_and_synchronized_run_tfbn_kernels_and_match_keras(kwargs, kernels):
    ours, theirs = twin_layers((8, 5), **kwargs)
    x = np.random.default_rng(10).normal(size=(8, 5)).astype(np.float32)
    np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True), rtol=1e-5,
                               atol=1e-5)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    types = op_types(ours, x)
    assert kernels <= types, types
    assert not {"Mean", "Sum"} & types, types  # no composite statistics


def test_mask_runs_the_weighted_kernels_and_matches_keras():
    ours, theirs = twin_layers((4, 6, 3))
    x = np.random.default_rng(11).normal(size=(4, 6, 3)).astype(np.float32)
    mask = np.random.default_rng(12).uniform(size=(4, 6)) > 0.3
    np.testing.assert_allclose(ours(x, training=True, mask=mask),
                               theirs(x, training=True, mask=mask), rtol=1e-5, atol=1e-5)
    types = op_types(ours, x, tf.constant(mask))
    assert {STATS_OP, APPLY_OP} <= types, types
    assert not {"Mean", "Sum"} & types, types


def test_float64_layer():
    ours, theirs = twin_layers((6, 3), dtype="float64")
    x = np.random.default_rng(13).normal(size=(6, 3))
    y = ours(x, training=True)
    assert y.dtype == "float64"
    np.testing.assert_allclose(y, theirs(x, training=True), rtol=1e-9, atol=1e-9)
