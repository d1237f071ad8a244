"""Loading the op library: the error when the installed TensorFlow is not the one tfbn
was built for, and a build whose XLA lowerings do not load (the ops work, the layer
reports supports_jit=False and Keras keeps XLA off). Each runs in a fresh process, as the
library loads once per process."""

import os
import subprocess
import sys
import textwrap

import tfbn


def run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def test_tensorflow_version_mismatch_says_which_and_how_to_rebuild():
    out = run_python("""
        import tensorflow as tf
        tf.__version__ = "2.99.0"  # as if another TensorFlow had been installed since
        try:
            import tfbn
        except ImportError as err:
            print("ImportError:", err)
        else:
            print("imported")
    """)
    assert out.returncode == 0, out.stderr
    built_for = tfbn.build_info()["tensorflow_version"]
    assert "ImportError:" in out.stdout, out.stdout
    assert f"was built for TensorFlow {built_for}" in out.stdout, out.stdout
    assert "TensorFlow 2.99.0 is installed" in out.stdout, out.stdout
    assert "pip install --no-build-isolation --force-reinstall ." in out.stdout, out.stdout


def test_without_xla_lowerings_the_layer_reports_no_jit_support():
    out = run_python("""
        import warnings
        import numpy as np
        import tensorflow as tf

        def fail(path):
            raise tf.errors.NotFoundError(None, None, "simulated: lowerings missing")

        tf.load_library = fail  # the XLA library fails to load; the op library does not
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import tfbn
        import keras
        print("warned", any("XLA lowerings" in str(w.message) for w in caught))
        print("xla", tfbn.build_info()["xla"])
        print("supports_jit", tfbn.BatchNormalization().supports_jit)
        x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
        y = tfbn.batch_norm(x)[0].numpy()
        print("op_works", abs(y.mean(0)).max() < 1e-5)
        model = keras.Sequential([keras.Input((4,)), tfbn.BatchNormalization(),
                                  keras.layers.Dense(1)])
        model.compile("sgd", "mse", jit_compile=True)
        print("jit_compile", model.jit_compile)
    """)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    if tfbn.build_info()["xla"]:  # a build with lowerings says that they did not load
        assert lines.get("warned") == "True", out.stdout
    assert lines.get("xla") == "False", out.stdout
    assert lines.get("supports_jit") == "False", out.stdout
    assert lines.get("op_works") == "True", out.stdout
    assert lines.get("jit_compile") == "False", out.stdout  # Keras turned XLA off
