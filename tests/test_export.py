"""Portable inference: the tfbn layer traced with training=False is TensorFlow's standard
ops, so a SavedModel serves in a process that never imports tfbn and TFLite converts it;
training graphs keep tfbn's op and .keras files keep tfbn's layers."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as ref
import tfbn

SHAPE = (6, 6, 4)


def _model(inference_op="tensorflow"):
    """Conv -> BN(relu) -> Conv -> BN + shortcut -> relu6 -> BN(silu) -> Dense -> BN (2-D)."""
    bn = lambda **kw: tfbn.BatchNormalization(inference_op=inference_op, **kw)  # noqa: E731
    inputs = keras.Input(SHAPE)
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = bn(activation="relu")(h)
    y = keras.layers.Conv2D(4, 3, padding="same")(h)
    h = bn(activation="relu6")(y, residual=h)
    h = bn(activation="silu")(h)
    h = keras.layers.Dense(5)(keras.layers.Flatten()(h))
    return keras.Model(inputs, bn(activation="relu")(h))


def _trained(rng, inference_op="tensorflow"):
    """A model after two training steps (moving statistics away from 0 and 1)."""
    keras.utils.set_random_seed(7)
    model = _model(inference_op)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x = rng.standard_normal((8,) + SHAPE).astype(np.float32)
    model.fit(x, rng.standard_normal((8, 5)).astype(np.float32), batch_size=4, verbose=0)
    return model


def _rel_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _op_types(graph_def):
    types = {node.op for node in graph_def.node}
    for fn in graph_def.library.function:
        types |= {node.op for node in fn.node_def}
    return types


def _tfbn_ops(concrete_function):
    return sorted(t for t in _op_types(concrete_function.graph.as_graph_def())
                  if t.startswith("Tfbn"))


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    x = np.load(sys.argv[2])
    fn = loaded.signatures["serving_default"]
    y = list(fn(tf.constant(x)).values())[0].numpy()
    np.save(sys.argv[3], y)
    ops = set()
    graph_def = fn.graph.as_graph_def()
    ops |= {n.op for n in graph_def.node}
    for f in graph_def.library.function:
        ops |= {n.op for n in f.node_def}
    print(json.dumps({"tfbn_imported": any(m.startswith("tfbn") for m in sys.modules),
                      "tfbn_ops": sorted(o for o in ops if o.startswith("Tfbn"))}))
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    rng = np.random.default_rng(5)
    model = _trained(rng)
    path = str(tmp_path_factory.mktemp("export") / "saved")
    model.export(path, verbose=False)
    x = rng.standard_normal((3,) + SHAPE).astype(np.float32)
    return model, path, x


def test_saved_model_serves_without_tfbn(exported, tmp_path):
    model, path, x = exported
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, path, str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")], capture_output=True, text=True, env=env, timeout=300,
        cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"tfbn_imported": False, "tfbn_ops": []}
    served = np.load(tmp_path / "y.npy")
    expected = model(x, training=False)
    assert _rel_diff(served, expected) < 1e-5
    # And with tfbn's op computing the same inference (inference_op='tfbn').
    twin = _model("tfbn")
    twin.set_weights(model.get_weights())
    assert _rel_diff(served, twin(x, training=False)) < 1e-5


def test_tflite_converts_and_agrees(exported):
    model, path, x = exported
    flat = tf.lite.TFLiteConverter.from_saved_model(path).convert()
    interpreter = tf.lite.Interpreter(model_content=flat)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    y = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert _rel_diff(y, model(x, training=False)) < 1e-5


def test_inference_graph_holds_no_tfbn_op_and_training_graph_does(rng):
    model = _model()
    spec = tf.TensorSpec((None,) + SHAPE, tf.float32)
    infer = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    assert _tfbn_ops(infer) == []
    train = tf.function(lambda x: model(x, training=True)).get_concrete_function(spec)
    assert "TfbnBatchNorm" in _tfbn_ops(train)
    # The check can fail: with inference_op='tfbn' the inference graph holds tfbn's op.
    twin = _model("tfbn")
    infer = tf.function(lambda x: twin(x, training=False)).get_concrete_function(spec)
    assert "TfbnBatchNorm" in _tfbn_ops(infer)


def test_tf_saved_model_save_is_portable_too(rng, tmp_path):
    model = _trained(rng)
    module = tf.Module()
    module.model = model
    module.serve = tf.function(lambda x: model(x, training=False),
                               input_signature=[tf.TensorSpec((None,) + SHAPE, tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "m"))
    loaded = tf.saved_model.load(str(tmp_path / "m"))
    serve = loaded.serve.get_concrete_function(tf.TensorSpec((None,) + SHAPE, tf.float32))
    assert _tfbn_ops(serve) == []
    x = rng.standard_normal((2,) + SHAPE).astype(np.float32)
    assert _rel_diff(serve(tf.constant(x)), model(x, training=False)) < 1e-6


LAYER_CASES = [  # (shape, axis, dtype): FusedBatchNormV3 for 4-D NHWC, else the composite
    ((3, 5, 4, 6), -1, "float32"),
    ((3, 6, 4, 5), 1, "float32"),
    ((7, 6), -1, "float32"),
    ((2, 3, 4, 3, 5), -1, "float32"),
    ((3, 5, 4, 6), -1, "float64"),
    ((3, 5, 4, 6), -1, "float16"),
]


@pytest.mark.parametrize("shape,axis,dtype", LAYER_CASES)
@pytest.mark.parametrize("activation", [None, "relu", "relu6", "silu"])
def test_portable_inference_matches_float64_and_tfbn_op(rng, shape, axis, dtype, activation):
    c = shape[axis]
    params = [rng.uniform(0.5, 2.0, c), rng.uniform(-1, 1, c), rng.standard_normal(c),
              rng.uniform(0.5, 2.0, c)]
    x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    residual = rng.standard_normal(shape).astype(dtype)
    pdtype = "float64" if dtype == "float64" else "float32"
    layers = {op: tfbn.BatchNormalization(axis=axis, activation=activation, inference_op=op,
                                          dtype=dtype) for op in ("tensorflow", "tfbn")}
    outputs = {}
    for op, layer in layers.items():
        layer.build(shape)
        layer.set_weights([p.astype(pdtype) for p in params])
        outputs[op] = np.asarray(layer(x, training=False, residual=residual), np.float64)
    z, _, _ = ref.forward(x, *[p.astype(pdtype) for p in params], axis=axis, training=False)
    z = z + residual.astype(np.float64)
    expected = {"relu": lambda v: np.maximum(v, 0), "relu6": lambda v: np.clip(v, 0, 6),
                "silu": lambda v: v / (1 + np.exp(-v)), None: lambda v: v}[activation](z)
    tol = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3}[dtype]
    for op, y in outputs.items():
        np.testing.assert_allclose(y, expected, rtol=tol, atol=tol * np.abs(expected).max(),
                                   err_msg=op)


def test_keras_file_keeps_tfbn_layers_and_inference_op(rng, tmp_path):
    model = _trained(rng, inference_op="tfbn")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    bns = [lyr for lyr in loaded.layers if isinstance(lyr, keras.layers.BatchNormalization)]
    assert bns and all(isinstance(lyr, tfbn.BatchNormalization) for lyr in bns)
    assert {lyr.inference_op for lyr in bns} == {"tfbn"}
    x = rng.standard_normal((3,) + SHAPE).astype(np.float32)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))
    assert "inference_op" not in tfbn.BatchNormalization().get_config()


def test_inference_op_is_checked():
    with pytest.raises(ValueError, match="inference_op must be 'tensorflow' or 'tfbn'.*'xla'"):
        tfbn.BatchNormalization(inference_op="xla")
