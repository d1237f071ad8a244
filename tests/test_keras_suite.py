"""Keras' own BatchNormalization test suite, with tfbn.BatchNormalization in place of
Keras' class (the suite ships inside the keras wheel)."""

import os
import re
import subprocess
import sys

import keras

SUITE = os.path.join(os.path.dirname(keras.__file__), "src", "layers", "normalization",
                     "batch_normalization_test.py")


def test_keras_batch_normalization_suite_passes_with_tfbn(tmp_path):
    source = open(SUITE).read()
    patched, count = re.subn(r"\blayers\.BatchNormalization\b", "tfbn.BatchNormalization",
                             source)
    assert count >= 10, "the Keras suite no longer names layers.BatchNormalization"
    path = tmp_path / "test_keras_bn_suite.py"
    path.write_text("import tfbn\n" + patched)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider",
         "-W", "ignore"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 30 and "failed" not in summary, summary
