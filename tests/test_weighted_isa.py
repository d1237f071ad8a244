"""The weighted (masked) split kernels on every instruction set: each set is forced with
TFBN_CPU_ISA in a fresh process, checked to have really run, held to a float64 reference,
and all give the same bits. The layouts include channels-last rows wider than the
kernels' 512-value buffers and rows narrow enough to be batched several per pass.

Run as a script (`python test_weighted_isa.py`) it is the child: it prints one JSON line.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ISAS = ("generic", "avx2", "avx512", "avx512_bf16")
# (shape, axis): rows of 3 and 37 channels (several rows per pass), 600 and 1030 (wider
# than a buffer), planar with planes of 1, 7x9 and 40x40.
LAYOUTS = [((64, 5, 3), -1), ((6, 11, 37), -1), ((40, 600), -1), ((8, 4, 1030), -1),
           ((50, 24, 1, 1), 1), ((4, 13, 7, 9), 1), ((2, 5, 40, 40), 1)]
TOLERANCE = {"float32": 2e-6, "float64": 2e-14}


def child():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from tfbn import _core, split

    rng = np.random.default_rng(7)
    digest = hashlib.sha256()
    errors = {}
    for dtype in ("float32", "float64"):
        for shape, axis in LAYOUTS:
            ax = axis % len(shape)
            wshape = tuple(d for i, d in enumerate(shape) if i != ax)
            x64 = rng.normal(3.0, 2.0, shape)
            dy64 = rng.normal(size=shape)
            w = (rng.random(wshape) < 0.6) * rng.uniform(0.25, 4.0, wshape)
            s64 = rng.uniform(0.5, 1.5, shape[ax])
            o64 = rng.normal(size=shape[ax])
            x, dy = tf.constant(x64.astype(dtype)), tf.constant(dy64.astype(dtype))
            s, o = tf.constant(s64.astype(dtype)), tf.constant(o64.astype(dtype))
            wt = tf.constant(w.astype(np.float32))
            with tf.GradientTape() as tape:
                tape.watch([x, s, o])
                y, mean, var = split.split_batch_norm(x, s, o, axis=axis, epsilon=1e-3,
                                                      weights=wt)
                loss = tf.reduce_sum(y * dy)
            got = [y, mean, var] + tape.gradient(loss, [x, s, o])
            for t in got:
                digest.update(t.numpy().tobytes())
            ref = reference(tf, x, s, o, wt, dy, ax)
            errors[f"{dtype} {shape} axis={axis}"] = max(
                float(np.max(np.abs(g.numpy().astype(np.float64) - r))
                      / max(1.0, np.max(np.abs(r))))
                for g, r in zip(got, ref))
    print(json.dumps({"digest": digest.hexdigest(), "errors": errors,
                      **_core.cpu_instruction_set_info()}))


def reference(tf, x, s, o, w, dy, ax):
    """Weighted BatchNorm and its gradient in float64, by TensorFlow's autodiff."""
    x, s, o, dy = (tf.cast(t, tf.float64) for t in (x, s, o, dy))
    wb = tf.expand_dims(tf.cast(w, tf.float64), ax)
    axes = [i for i in range(len(x.shape)) if i != ax]
    bshape = [-1 if i == ax else 1 for i in range(len(x.shape))]
    with tf.GradientTape() as tape:
        tape.watch([x, s, o])
        wsum = tf.reduce_sum(wb * tf.ones_like(x), axes)
        mean = tf.reduce_sum(wb * x, axes) / wsum
        var = tf.reduce_sum(wb * (x - tf.reshape(mean, bshape)) ** 2, axes) / wsum
        # epsilon is a float attribute: the kernels add float32(1e-3)
        eps = float(np.float32(1e-3))
        y = ((x - tf.reshape(mean, bshape)) * tf.math.rsqrt(tf.reshape(var, bshape) + eps)
             * tf.reshape(s, bshape) + tf.reshape(o, bshape))
        loss = tf.reduce_sum(y * dy)
    return [t.numpy() for t in [y, mean, var] + tape.gradient(loss, [x, s, o])]


@pytest.fixture(scope="module")
def runs():
    from tfbn import _core

    supported = _core.cpu_instruction_set_info()["supported"]
    results = {}
    for isa in ISAS:
        if isa not in supported:
            continue
        env = dict(os.environ, TFBN_CPU_ISA=isa)
        out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, check=True,
                             capture_output=True, text=True, timeout=600)
        results[isa] = json.loads(out.stdout.strip().splitlines()[-1])
    return supported, results


@pytest.mark.parametrize("isa", ISAS)
def test_weighted_kernels_on_a_forced_instruction_set_match_float64(runs, isa):
    supported, results = runs
    if isa not in supported:
        pytest.skip(f"this processor lacks {isa} (it supports {' '.join(supported)})")
    result = results[isa]
    assert result["isa"] == isa and result["warning"] is None, result
    for case, error in result["errors"].items():
        assert error <= TOLERANCE[case.split()[0]], (isa, case, error)


def test_weighted_kernels_give_the_same_bits_on_every_instruction_set(runs):
    supported, results = runs
    if len(results) < 2:
        pytest.skip(f"only {' '.join(supported)} runs here: nothing to compare")
    digests = {isa: r["digest"] for isa, r in results.items()}
    assert len(digests) == len([i for i in ISAS if i in supported])
    assert len(set(digests.values())) == 1, digests


if __name__ == "__main__":
    child()
