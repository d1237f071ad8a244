"""The pybind11 module tfbn._core: the same core kernels on NumPy arrays, no TensorFlow."""

import importlib.util
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import reference as ref
import tfbn

CORE_PATH = next(
    os.path.join(os.path.dirname(tfbn.__file__), f)
    for f in os.listdir(os.path.dirname(tfbn.__file__)) if f.startswith("_core.")
)


def load_core():
    """Loads the extension from its file, without importing the tfbn package."""
    spec = importlib.util.spec_from_file_location("_core", CORE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


core = load_core()
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
          "float64": np.float64}


def test_module_does_not_need_tensorflow():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_core', {CORE_PATH!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "import numpy as np\n"
        "y = m.batch_norm_forward(np.arange(12, dtype=np.float32).reshape(4, 3))[0]\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print(float(abs(y).max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert float(out.stdout) > 1.0


@pytest.mark.parametrize("dtype_name", list(DTYPES))
# Planar layouts with more channels than the kernels keep sums for at once (1030, 130) and
# planes longer than a flush stretch (24x24).
@pytest.mark.parametrize("shape,axis", [((5, 4, 3, 6), -1), ((5, 6, 3, 4), 1), ((40, 9), -1),
                                        ((2, 3, 4, 5, 6), 2), ((3, 1030, 2, 5), 1),
                                        ((9, 130, 24, 24), 1)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_and_backward_match_reference(shape, axis, dtype_name, training, threads):
    rng = np.random.default_rng(0)
    p = np.float64 if dtype_name == "float64" else np.float32
    c = shape[axis]
    x = rng.normal(4.0, 2.0, shape).astype(DTYPES[dtype_name])
    dy = rng.normal(size=shape).astype(DTYPES[dtype_name])
    scale, offset = rng.uniform(0.5, 1.5, c).astype(p), rng.normal(size=c).astype(p)
    mean, var = rng.normal(size=c).astype(p), rng.uniform(0.5, 2, c).astype(p)
    kw = dict(axis=axis, epsilon=1e-3, training=training, threads=threads)
    y, bm, bv, mean_lo = core.batch_norm_forward(x, scale, offset, mean, var, **kw)
    y_ref, m_ref, v_ref = ref.forward(x, scale, offset, mean, var, axis=axis,
                                      training=training)
    ref.assert_close(y, y_ref, dtype_name, "y")
    # hi + lo carries the mean to well below float32's resolution of the data.
    mean_tol = 1e-12 if dtype_name == "float64" else 1e-7 * float(np.std(x.astype(np.float64)))
    np.testing.assert_allclose(bm.astype(np.float64) + mean_lo, m_ref, rtol=0, atol=mean_tol)
    np.testing.assert_allclose(bv, v_ref, rtol=1e-6)
    dx, dscale, doffset = core.batch_norm_backward(dy, x, scale, bm, bv, mean_lo, **kw)
    dx_ref, ds_ref, do_ref = ref.backward(dy, x, scale, bm.astype(np.float64) + mean_lo, bv,
                                          axis=axis, training=training)
    ref.assert_close(dx, dx_ref, dtype_name, "dx")
    np.testing.assert_allclose(dscale, ds_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(doffset, do_ref, rtol=1e-5, atol=1e-5)


def test_thread_count_does_not_change_bits():
    x = np.random.default_rng(1).normal(3, 1, (64, 28, 28, 16)).astype(np.float32)
    runs = [core.batch_norm_forward(x, threads=t) for t in (1, 2, 5)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert a.tobytes() == b.tobytes()


def test_errors_name_the_argument():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="x must have rank >= 2"):
        core.batch_norm_forward(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="axis = 2 is out of range"):
        core.batch_norm_forward(x, axis=2)
    with pytest.raises(ValueError, match="scale must be a vector of length C = 3"):
        core.batch_norm_forward(x, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="mean is required"):
        core.batch_norm_forward(x, training=False)
    with pytest.raises(ValueError, match="epsilon must be positive"):
        core.batch_norm_forward(x, epsilon=0.0)
    with pytest.raises(ValueError,
                       match="x must be float16, bfloat16, float32 or float64, got int32"):
        core.batch_norm_forward(np.ones((2, 2), np.int32))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_out_receives_y_and_dx_with_the_same_bits(dtype_name):
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (6, 5, 40)).astype(DTYPES[dtype_name])
    dy = rng.normal(size=x.shape).astype(x.dtype)
    scale = rng.uniform(0.5, 1.5, 40).astype(np.float32)
    y, mean, var, lo = core.batch_norm_forward(x, scale, None)
    dx = core.batch_norm_backward(dy, x, scale, mean, var, lo)[0]
    out = np.full_like(x, 7)
    got = core.batch_norm_forward(x, scale, None, out=out)
    assert got[0] is out and out.tobytes() == y.tobytes()
    out = np.full_like(x, 7)
    got = core.batch_norm_backward(dy, x, scale, mean, var, lo, out=out)
    assert got[0] is out and out.tobytes() == dx.tobytes()
    in_place = x.copy()  # y over x itself: every element is read before it is written
    core.batch_norm_forward(in_place, scale, None, out=in_place)
    assert in_place.tobytes() == y.tobytes()


def test_out_is_checked():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="out must have the dtype and shape of x.*float64"):
        core.batch_norm_forward(x, out=np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"out must have the dtype and shape of x.*\(3, 4\)"):
        core.batch_norm_backward(x, x, None, np.zeros(3, np.float32), np.ones(3, np.float32),
                                 out=np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="out must be C-contiguous and writable"):
        core.batch_norm_forward(x, out=np.ones((3, 4), np.float32).T)
    with pytest.raises(ValueError, match="out must be a NumPy array"):
        core.batch_norm_forward(x, out=[[0.0] * 3] * 4)


def test_stream_copy():
    src = np.random.default_rng(2).normal(size=100_003).astype(np.float32)
    dst = np.empty_like(src)
    core.stream_copy(src, dst, threads=2)
    np.testing.assert_array_equal(src, dst)
    with pytest.raises(ValueError, match="same byte size"):
        core.stream_copy(src, np.empty(3, np.float32))


def test_non_native_byte_order_is_refused():
    x = np.ones((4, 3), ">f4" if np.little_endian else "<f4")
    with pytest.raises(ValueError, match="byte order"):
        core.batch_norm_forward(x)


@pytest.mark.parametrize("activation", ["identity", "relu", "relu6", "silu"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("training", [True, False])
def test_epilogue_matches_reference_and_the_tf_op(activation, dtype_name, training):
    """residual=/activation= give act(BN(x) + residual) and its four gradients: against
    float64 math, and bit for bit the TensorFlow op's (the same core kernels)."""
    import tensorflow as tf

    from test_epilogue import make_case, reference

    rng = np.random.default_rng(3)
    shape, axis = (6, 5, 4, 40), -1
    x, scale, offset, res, mean, var, dy = make_case(rng, shape, axis, dtype_name, True,
                                                     activation, training)
    kw = dict(axis=axis, training=training, threads=2)
    y, bm, bv, mean_lo = core.batch_norm_forward(x, scale, offset, mean, var, residual=res,
                                                 activation=activation, **kw)
    dx, dscale, doffset, dres = core.batch_norm_backward(
        dy, x, scale, bm, bv, mean_lo, offset=offset, residual=res, activation=activation, **kw)
    y_ref, dx_ref, ds_ref, do_ref, dres_ref, _ = reference(x, scale, offset, res, dy, activation,
                                                           axis, training, mean, var)
    ref.assert_close(y, y_ref, dtype_name, "y")
    ref.assert_close(dx, dx_ref, dtype_name, "dx")
    ref.assert_close(dres, dres_ref, dtype_name, "dresidual")
    np.testing.assert_allclose(dscale, ds_ref, rtol=2e-5, atol=2e-5 * np.abs(ds_ref).max())
    np.testing.assert_allclose(doffset, do_ref, rtol=2e-5, atol=2e-5 * np.abs(do_ref).max())
    stats = {} if training else {"mean": mean, "variance": var}
    xt, rt = tf.constant(x), tf.constant(res)
    with tf.GradientTape() as tape:
        tape.watch([xt, rt])
        y_tf = tfbn.batch_norm(xt, scale, offset, axis=axis, training=training, residual=rt,
                               activation=activation, **stats)[0]
    dx_tf, dres_tf = tape.gradient(y_tf, [xt, rt], output_gradients=tf.constant(dy))
    for a, b in ((y, y_tf), (dx, dx_tf), (dres, dres_tf)):
        assert a.tobytes() == np.asarray(b).tobytes()


def test_epilogue_arguments_are_checked():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError,
                       match="activation must be one of None, 'identity', 'relu', 'relu6', "
                             "'silu', 'linear', 'swish', got activation='tanh'"):
        core.batch_norm_forward(x, activation="tanh")
    with pytest.raises(ValueError, match=r"residual must have the dtype and shape of x "
                                         r"\(float32, \(4, 3\)\), got residual of dtype "
                                         r"float32, shape \(4, 2\)"):
        core.batch_norm_forward(x, residual=np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"residual must have the dtype and shape of x "
                                         r"\(float32, \(4, 3\)\), got residual of dtype "
                                         r"float64, shape \(4, 3\)"):
        core.batch_norm_backward(x, x, mean=np.zeros(3, np.float32),
                                 variance=np.ones(3, np.float32), residual=np.ones((4, 3)),
                                 activation="relu")
    assert len(core.batch_norm_backward(x, x, mean=np.zeros(3, np.float32),
                                        variance=np.ones(3, np.float32))) == 3


def test_the_mean_lo_keyword_names_the_low_part_of_the_mean():
    rng = np.random.default_rng(3)
    x = rng.normal(1e4, 1.0, (64, 3)).astype(np.float32)
    dy = rng.normal(size=(64, 3)).astype(np.float32)
    y, bm, bv, lo = core.batch_norm_forward(x)
    assert np.any(lo != 0)  # float32(mean) alone misses part of a mean near 1e4
    by_position = core.batch_norm_backward(dy, x, None, bm, bv, lo)
    by_name = core.batch_norm_backward(dy, x, mean=bm, variance=bv, mean_lo=lo)
    without = core.batch_norm_backward(dy, x, mean=bm, variance=bv)
    for a, b in zip(by_position, by_name):
        assert a.tobytes() == b.tobytes()
    assert by_name[0].tobytes() != without[0].tobytes()


def test_the_instruction_set_info_names_what_runs():
    info = core.cpu_instruction_set_info()
    assert info["isa"] == core.cpu_instruction_set()
    assert info["supported"][0] == "generic" and info["isa"] in info["supported"]
    assert set(info["supported"]) <= {"generic", "avx2", "avx512", "avx512_bf16"}


def test_build_info_reports_the_instruction_set_that_runs():
    assert tfbn.build_info()["cpu_instruction_set"] == core.cpu_instruction_set_info()
