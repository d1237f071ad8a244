"""tfbn.convert: Keras models to tfbn layers (with the fused epilogue) and back, against
the original model's outputs, gradients, training and weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn

L = keras.layers


def _randomize_statistics(model, seed=0):
    """BatchNormalization weights away from their 1/0/0/1 start, so that inference
    compares something."""
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c),
                               rng.uniform(-0.5, 0.5, c), rng.uniform(0.5, 1.5, c)])


def _all_layers(model):
    return [lyr for lyr in model._flatten_layers(include_self=False)]


def _bns(model):
    return [lyr for lyr in _all_layers(model) if isinstance(lyr, L.BatchNormalization)]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _block_model():
    """Every pattern: BN->ReLU, BN->Add->Activation(relu), BN->Activation(silu),
    BN->Add (no activation), BN->ReLU(6), and a BN whose output is also a model output."""
    inputs = keras.Input((8, 8, 3))
    a = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inputs)))
    b = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(a))
    c = L.Activation("relu")(L.Add()([a, b]))
    d = L.Activation("silu")(L.BatchNormalization()(c))
    e = L.Add()([d, L.BatchNormalization()(L.Conv2D(4, 1)(d))])
    f = L.ReLU(max_value=6.0)(L.BatchNormalization()(e))
    g = L.BatchNormalization()(f)  # also an output: not fused
    h = L.Activation("swish")(g)
    out = L.Dense(3)(L.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, [out, g])


@pytest.fixture
def block_model():
    keras.utils.set_random_seed(3)
    model = _block_model()
    _randomize_statistics(model)
    return model


def _x(rng, shape=(4, 8, 8, 3)):
    return rng.standard_normal(shape).astype(np.float32)


def test_patterns_fuse_and_outputs_match(block_model, rng):
    converted = tfbn.convert(block_model)
    bns = _bns(converted)
    assert all(isinstance(lyr, tfbn.BatchNormalization) for lyr in bns) and len(bns) == 6
    acts = {lyr.name: lyr.activation for lyr in bns}
    names = [lyr.name for lyr in _bns(block_model)]
    assert [acts[n] for n in names] == ["relu", "relu", "silu", None, "relu6", None]
    # Fused layers replaced 4 activations and 2 adds; the model output g stays unfused.
    assert len(converted.layers) == len(block_model.layers) - 6
    assert sum(isinstance(lyr, L.Add) for lyr in converted.layers) == 0
    assert all(isinstance(lyr, tfbn.BatchNormalization) or not isinstance(lyr, L.BatchNormalization)
               for lyr in converted.layers)
    x = _x(rng)
    for training in (False, True):
        for got, want in zip(converted(x, training=training), block_model(x, training=training)):
            assert _rel(got, want) < 1e-5, training
    unfused = tfbn.convert(block_model, fuse_epilogue=False)
    assert [lyr.activation for lyr in _bns(unfused)] == [None] * 6
    assert len(unfused.layers) == len(block_model.layers)


def test_weights_are_copied_not_shared(block_model):
    converted = tfbn.convert(block_model)
    for layer in block_model.layers:
        if layer.weights:
            twin = converted.get_layer(layer.name)
            for a, b in zip(layer.weights, twin.weights):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
                assert a is not b
    before = block_model.get_weights()
    converted.get_layer(_bns(block_model)[0].name).moving_mean.assign(tf.fill([4], 9.0))
    for a, b in zip(before, block_model.get_weights()):
        np.testing.assert_array_equal(a, b)


def _gradients(model, x, dy_seed=11):
    """Gradients of a random projection of the outputs (training mode), by name
    ('x' and 'layer/weight')."""
    with tf.GradientTape() as tape:
        x = tf.constant(x)
        tape.watch(x)
        outputs = keras.tree.flatten(model(x, training=True))
        rng = np.random.default_rng(dy_seed)
        loss = sum(tf.reduce_sum(o * rng.standard_normal(o.shape).astype(o.dtype.name))
                   for o in outputs)
    variables = {f"{lyr.name}/{v.name}": v for lyr in _all_layers(model)
                 for v in lyr._trainable_variables}
    grads = tape.gradient(loss, [x] + list(variables.values()))
    return {"x": grads[0], **dict(zip(variables, grads[1:]))}


def _assert_gradients_match(got, want, rtol):
    assert set(got) == set(want)
    largest = max(float(np.max(np.abs(g))) for g in want.values())
    zero = 1e-5 * largest
    for name, g in want.items():
        if np.max(np.abs(g)) < zero:
            # 0 in exact arithmetic (a conv bias or a beta before a training-mode
            # BatchNormalization, whose input gradient sums to 0 per channel): both are
            # rounding noise.
            assert np.max(np.abs(got[name])) < zero, name
        else:
            assert _rel(got[name], g) < rtol, name


def test_training_gradients_match(block_model, rng):
    x = _x(rng)
    want = _gradients(block_model, x)
    for fuse in (True, False):
        _assert_gradients_match(_gradients(tfbn.convert(block_model, fuse_epilogue=fuse), x),
                                want, rtol=2e-5)


def test_convert_back_to_keras(block_model, rng):
    converted = tfbn.convert(block_model)
    back = tfbn.convert(converted, to="keras")
    assert not any(isinstance(lyr, tfbn.BatchNormalization) for lyr in _all_layers(back))
    assert len(back.layers) == len(block_model.layers)
    types = lambda m: sorted(type(lyr).__name__ for lyr in m.layers)  # noqa: E731
    assert types(back) == sorted(t.replace("ReLU", "Activation") for t in types(block_model))
    for layer in _bns(block_model):
        for a, b in zip(layer.get_weights(), back.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert "activation" not in back.get_layer(_bns(block_model)[0].name).get_config()
    x = _x(rng)
    for training in (False, True):
        for got, want in zip(back(x, training=training), block_model(x, training=training)):
            assert _rel(got, want) < 1e-5


def test_sequential_round_trip(rng):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), L.Dense(6), L.BatchNormalization(),
                              L.ReLU(6.0), L.Dense(4), L.BatchNormalization(), L.Dense(2)])
    _randomize_statistics(model)
    converted = tfbn.convert(model)
    assert isinstance(converted, keras.Sequential)
    assert [type(lyr).__name__ for lyr in converted.layers] == [
        "Dense", "BatchNormalization", "Dense", "BatchNormalization", "Dense"]
    assert [lyr.activation for lyr in _bns(converted)] == ["relu6", None]
    back = tfbn.convert(converted, to="keras")
    assert [type(lyr).__name__ for lyr in back.layers] == [
        "Dense", "BatchNormalization", "Activation", "Dense", "BatchNormalization", "Dense"]
    x = rng.standard_normal((7, 5)).astype(np.float32)
    for training in (False, True):  # each call with training=True moves the statistics once
        want = model(x, training=training)
        for m in (converted, back):
            assert _rel(m(x, training=training), want) < 1e-5


def test_sequential_keeps_its_input_dtype(rng):
    model = keras.Sequential([keras.Input((4,), dtype="int32"), L.Embedding(10, 3),
                              L.BatchNormalization(), L.Activation("relu6")])
    _randomize_statistics(model)
    converted = tfbn.convert(model)
    assert converted.inputs[0].dtype == "int32"
    assert [type(lyr).__name__ for lyr in converted.layers] == ["Embedding", "BatchNormalization"]
    x = rng.integers(0, 10, (5, 4)).astype(np.int32)
    assert _rel(converted(x, training=False), model(x, training=False)) < 1e-6


def test_nested_model_and_shared_layers(rng):
    keras.utils.set_random_seed(2)
    inner_in = keras.Input((6, 6, 4))
    inner = keras.Model(inner_in, L.ReLU()(L.BatchNormalization()(
        L.Conv2D(4, 3, padding="same")(inner_in))), name="inner")
    shared_bn = L.BatchNormalization(name="shared_bn")
    inputs = keras.Input((6, 6, 4))
    a = inner(inputs)
    b = inner(L.ReLU()(shared_bn(inputs)))  # the nested model called twice
    c = shared_bn(a)  # a BatchNormalization called twice: converted, not fused
    model = keras.Model(inputs, L.Add()([b, c]))
    _randomize_statistics(model)
    converted = tfbn.convert(model)
    new_inner = converted.get_layer("inner")
    assert isinstance(new_inner, keras.Model) and new_inner is not inner
    assert [lyr.activation for lyr in _bns(new_inner)] == ["relu"]
    shared = converted.get_layer("shared_bn")
    assert isinstance(shared, tfbn.BatchNormalization) and shared.activation is None
    assert len(converted.weights) == len(model.weights)  # sharing kept: no extra copies
    x = rng.standard_normal((3, 6, 6, 4)).astype(np.float32)
    for training in (False, True):
        assert _rel(converted(x, training=training), model(x, training=training)) < 1e-5
    back = tfbn.convert(converted, to="keras")
    assert not any(isinstance(lyr, tfbn.BatchNormalization) for lyr in _all_layers(back))
    assert _rel(back(x, training=False), model(x, training=False)) < 1e-5


def test_fit_after_convert_matches_keras(block_model, rng):
    x = _x(rng, (16, 8, 8, 3))
    y = rng.standard_normal((16, 3)).astype(np.float32)
    single = keras.Model(block_model.input, block_model.output[0])
    converted = tfbn.convert(single)
    losses = {}
    for name, model in (("keras", single), ("tfbn", converted)):
        model.compile(keras.optimizers.SGD(0.01), "mse")
        hist = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        losses[name] = hist.history["loss"]
    assert losses["tfbn"][-1] < losses["tfbn"][0]
    np.testing.assert_allclose(losses["tfbn"], losses["keras"], rtol=1e-4)
    assert _rel(converted.predict(x, verbose=0), single.predict(x, verbose=0)) < 1e-4


def test_compiled_model_stays_compiled(block_model):
    block_model.compile("adam", "mse")
    assert tfbn.convert(block_model).compiled


@pytest.fixture(scope="module")
def resnet50():
    keras.utils.set_random_seed(4)
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10,
                                        classifier_activation=None)
    _randomize_statistics(model)
    return model


def test_resnet50_convert_and_back(resnet50, rng):
    converted = tfbn.convert(resnet50)
    bns = _bns(converted)
    assert len(bns) == 53 and all(isinstance(lyr, tfbn.BatchNormalization) for lyr in bns)
    fused = [lyr for lyr in bns if lyr.activation == "relu"]
    # The stem and two per block (BN -> relu), and each block's tail (BN -> add -> relu);
    # in the 4 blocks with a projection shortcut one of the add's two BNs fuses.
    assert len(fused) == 1 + 2 * 16 + 16
    assert len(converted.layers) == len(resnet50.layers) - 49 - 16
    # An Add of two BatchNormalizations (the blocks with a projection shortcut) fuses the
    # first in execution order, the shortcut's; the main path's is its residual.
    unfused = {lyr.name for lyr in bns if lyr.activation is None}
    assert unfused == {f"conv{s}_block1_3_bn" for s in range(2, 6)}
    x = _x(rng, (4, 32, 32, 3))
    assert _rel(converted(x, training=False), resnet50(x, training=False)) < 1e-5
    back = tfbn.convert(converted, to="keras")
    assert len(back.layers) == len(resnet50.layers)
    assert not any(isinstance(lyr, tfbn.BatchNormalization) for lyr in back.layers)
    for layer in _bns(resnet50):
        for a, b in zip(layer.get_weights(), back.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert _rel(back(x, training=False), resnet50(x, training=False)) < 1e-5


def test_resnet50_training_gradients_match_in_float64(rng):
    """Every gradient of a training step, fused tails included. In float64: through 53
    training-mode BatchNormalizations on batches of 4 (1x1 planes at the end) the
    gradients amplify rounding so much that Keras' own float32 gradients differ from its
    float64 ones by several percent, which would hide any real difference."""
    keras.config.set_dtype_policy("float64")
    try:
        keras.utils.set_random_seed(4)
        model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3),
                                            classes=10, classifier_activation=None)
    finally:
        keras.config.set_dtype_policy("float32")
    _randomize_statistics(model)
    converted = tfbn.convert(model)
    assert sum(lyr.activation is not None for lyr in _bns(converted)) == 49
    x = rng.standard_normal((4, 32, 32, 3))
    got, want = _gradients(converted, x), _gradients(model, x)
    assert len(want) == 1 + 53 * 2 + 53 * 2 + 2
    _assert_gradients_match(got, want, rtol=1e-6)


def test_mobilenet_v2_convert_and_back(rng):
    keras.utils.set_random_seed(5)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10,
                                           classifier_activation=None)
    _randomize_statistics(model)
    converted = tfbn.convert(model)
    acts = [lyr.activation for lyr in _bns(converted)]
    assert len(acts) == 52 and all(isinstance(lyr, tfbn.BatchNormalization)
                                   for lyr in _bns(converted))
    # BN -> ReLU(6) after the stem, every expansion and depthwise conv and the head; the
    # projections of the 10 blocks with a skip connection fuse their add.
    assert acts.count("relu6") == 35 and acts.count(None) == 17
    assert sum(isinstance(lyr, L.Add) for lyr in converted.layers) == 0
    x = _x(rng, (2, 32, 32, 3))
    assert _rel(converted(x, training=False), model(x, training=False)) < 1e-5
    back = tfbn.convert(converted, to="keras")
    assert len(back.layers) == len(model.layers)
    assert _rel(back(x, training=False), model(x, training=False)) < 1e-5


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.bn = L.BatchNormalization()

    def call(self, x):
        return self.bn(x)


class _BlockLayer(L.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = L.BatchNormalization()

    def call(self, x):
        return self.bn(x) * 2.0


def test_errors_name_what_cannot_be_converted():
    with pytest.raises(TypeError, match="cannot convert _Subclassed, a subclassed keras.Model"):
        tfbn.convert(_Subclassed())
    inputs = keras.Input((4,))
    model = keras.Model(inputs, _BlockLayer(name="block")(inputs))
    with pytest.raises(TypeError, match="layer 'block' of class _BlockLayer"):
        tfbn.convert(model)
    # Nested inside a Functional model, a subclassed model is refused the same way.
    outer = keras.Model(inputs, _Subclassed()(inputs))
    with pytest.raises(TypeError, match="_Subclassed"):
        tfbn.convert(outer)
    with pytest.raises(TypeError, match="must be a keras.Model.*Dense"):
        tfbn.convert(L.Dense(3))
    with pytest.raises(ValueError, match="to must be 'tfbn' or 'keras', got to='torch'"):
        tfbn.convert(keras.Sequential([L.Dense(2)]), to="torch")
    with pytest.raises(TypeError, match="fuse_epilogue must be a bool"):
        tfbn.convert(keras.Sequential([L.Dense(2)]), fuse_epilogue="yes")
