"""The GPU kernels against the CPU kernels on the same inputs (tests/gpu/data, written by
make_cpu_reference.py where TensorFlow is installed). Given the same statistics or sums, the
elementwise passes must give the CPU's bits exactly (the numerics contract); the statistics
and sums themselves agree up to the order of their additions."""

import os

import numpy as np
import pytest

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cpu_reference.npz")
LAYOUTS = {"nhwc": -1, "nchw": 1, "nc": -1}
DTYPES = ["float32", "float16", "bfloat16", "float64"]
EPS = 1e-3
# Where only the statistics' last bits may differ: the data's precision.
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2, "float64": 1e-12}
CASES = [(d, lay) for d in DTYPES for lay in LAYOUTS]


@pytest.fixture(scope="module")
def ref():
    if not os.path.exists(DATA):
        pytest.skip(f"{DATA} missing: run tests/gpu/make_cpu_reference.py")
    return np.load(DATA)


class Case:
    def __init__(self, torch, ref, dtype, layout):
        self.torch, self.ref, self.dtype, self.layout = torch, ref, dtype, layout
        self.axis = LAYOUTS[layout]
        self.tdtype = {"float32": torch.float32, "float16": torch.float16,
                       "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
        self.udtype = torch.float64 if dtype == "float64" else torch.float32

    def np(self, key):
        return self.ref[f"{self.dtype}/{self.layout}/{key}"]

    def dev(self, key):
        a = self.np(key)
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        if self.dtype == "bfloat16" and a.dtype == np.uint16:
            t = t.view(self.torch.int16).view(self.torch.bfloat16)
        return t.cuda()

    def channels(self, n=1):
        c = self.np("scale").shape[0]
        return [self.torch.empty(c, dtype=self.udtype, device="cuda") for _ in range(n)]

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream


def bits(t):
    """A tensor's raw bits as a NumPy integer array (for bitwise comparisons)."""
    import torch

    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view).cpu().numpy()


def ref_bits(c, key):
    a = c.np(key)
    return a.view({2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize])


def f64(t):
    return t.detach().double().cpu().numpy()


def ref_f64(c, key):
    a = c.np(key)
    if c.dtype == "bfloat16" and a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def assert_same_bits(c, t, key):
    got, want = bits(t), ref_bits(c, key)
    bad = np.flatnonzero(got.ravel() != want.ravel())
    assert bad.size == 0, (f"{c.dtype} {c.layout} {key}: {bad.size} of {got.size} differ from "
                           f"the CPU, first at {bad[0]}: {f64(t).ravel()[bad[0]]!r} vs "
                           f"{ref_f64(c, key).ravel()[bad[0]]!r}")


def assert_close(c, t, key, tol=None):
    tol = TOL[c.dtype] if tol is None else tol
    np.testing.assert_allclose(f64(t), ref_f64(c, key), rtol=tol, atol=tol,
                               err_msg=f"{c.dtype} {c.layout} {key}")


@pytest.mark.parametrize("dtype,layout", CASES)
def test_fused_op(core, torch, ref, dtype, layout):
    c = Case(torch, ref, dtype, layout)
    x, dy, scale, offset = c.dev("x"), c.dev("dy"), c.dev("scale"), c.dev("offset")
    y = torch.empty_like(x)
    bm, bv, lo = c.channels(3)
    core.cuda_batch_norm_forward(x, scale, offset, y=y, batch_mean=bm, batch_variance=bv,
                                 mean_lo=lo, axis=c.axis, epsilon=EPS, stream=c.stream())
    stat_tol = 1e-12 if dtype == "float64" else 1e-6
    assert_close(c, bm, "fused_mean", stat_tol)
    assert_close(c, bv, "fused_variance", stat_tol)
    assert_close(c, y, "fused_y")
    # Inference with the CPU's statistics: the elementwise pass alone, the CPU's bits.
    mean, var = c.dev("fused_mean"), c.dev("fused_variance")
    core.cuda_batch_norm_forward(x, scale, offset, mean, var, y=y, batch_mean=bm,
                                 batch_variance=bv, mean_lo=lo, axis=c.axis, epsilon=EPS,
                                 training=False, stream=c.stream())
    assert_same_bits(c, y, "fused_y_inference")
    dx = torch.empty_like(x)
    ds, do = c.channels(2)
    core.cuda_batch_norm_backward(dy, x, scale, mean, var, None, dx=dx, dscale=ds, doffset=do,
                                  axis=c.axis, epsilon=EPS, training=False, stream=c.stream())
    assert_same_bits(c, dx, "fused_dx_inference")
    core.cuda_batch_norm_backward(dy, x, scale, mean, var, c.dev("fused_mean_lo"), dx=dx,
                                  dscale=ds, doffset=do, axis=c.axis, epsilon=EPS,
                                  stream=c.stream())
    assert_close(c, dx, "fused_dx")
    assert_close(c, ds, "fused_dscale", 1e-9 if dtype == "float64" else 1e-4)
    assert_close(c, do, "fused_doffset", 1e-9 if dtype == "float64" else 1e-4)


@pytest.mark.parametrize("dtype,layout", CASES)
@pytest.mark.parametrize("prefix", ["split_", "weighted_"])
def test_split_family(core, torch, ref, dtype, layout, prefix):
    c = Case(torch, ref, dtype, layout)
    x, dy, scale, offset = c.dev("x"), c.dev("dy"), c.dev("scale"), c.dev("offset")
    weights = c.dev("weights") if prefix == "weighted_" else None
    C = scale.shape[0]
    partial = torch.empty((3, C), dtype=torch.float64, device="cuda")
    core.cuda_partial_moments(x, weights, partial=partial, axis=c.axis, stream=c.stream())
    got, want = f64(partial), c.np(prefix + "partial")
    np.testing.assert_array_equal(got[0], want[0])  # counts (weight sums) are exact
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-6, atol=1e-9)
    # Merging the CPU's partial: double arithmetic in the same order, the same bits.
    mean, var, lo = c.channels(3)
    count = torch.empty(C, dtype=torch.float64, device="cuda")
    core.cuda_merge_moments(c.dev(prefix + "partial")[None], mean=mean, variance=var,
                            mean_lo=lo, count=count, stream=c.stream())
    for t, key in ((mean, "mean"), (var, "variance"), (lo, "mean_lo"), (count, "count")):
        assert_same_bits(c, t, prefix + key)
    # The apply steps on the CPU's statistics and sums: the CPU's bits.
    mean, var, lo = c.dev(prefix + "mean"), c.dev(prefix + "variance"), c.dev(prefix + "mean_lo")
    if prefix == "split_":
        y = torch.empty_like(x)
        core.cuda_apply_statistics(x, scale, offset, mean, var, lo, y=y, axis=c.axis,
                                   epsilon=EPS, stream=c.stream())
        assert_same_bits(c, y, "split_y")
    sums = torch.empty((2, C), dtype=torch.float64, device="cuda")
    core.cuda_grad_sums(dy, x, mean, lo, sums=sums, axis=c.axis, stream=c.stream())
    # Sums of float products, summed in float over stretches: a few 1e-6 apart, relative
    # to the terms (not to the sum, which can cancel).
    sum_tol = 1e-9 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(f64(sums), c.np(prefix + "sums"), rtol=sum_tol, atol=sum_tol)
    cpu_sums, cpu_count = c.dev(prefix + "sums"), c.dev(prefix + "count")
    dx = torch.empty_like(x)
    ds, do = c.channels(2)
    core.cuda_apply_grad_with_sums(dy, x, scale, mean, var, lo, cpu_sums, cpu_sums, cpu_count,
                                   weights, dx=dx, dscale=ds, doffset=do, axis=c.axis,
                                   epsilon=EPS, stream=c.stream())
    assert_same_bits(c, dx, prefix + "dx")
    assert_same_bits(c, ds, prefix + "dscale")
    assert_same_bits(c, do, prefix + "doffset")


@pytest.mark.parametrize("dtype,layout", CASES)
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_epilogue(core, torch, ref, dtype, layout, act):
    c = Case(torch, ref, dtype, layout)
    x, dy, scale, offset = c.dev("x"), c.dev("dy"), c.dev("scale"), c.dev("offset")
    res = c.dev("residual") if act == "relu" else None
    p = f"epilogue_{act}_"
    y = torch.empty_like(x)
    bm, bv, lo = c.channels(3)
    core.cuda_batch_norm_forward(x, scale, offset, y=y, batch_mean=bm, batch_variance=bv,
                                 mean_lo=lo, axis=c.axis, epsilon=EPS, residual=res,
                                 activation=act, stream=c.stream())
    assert_close(c, y, p + "y")
    # Inference with the CPU's statistics: the CPU's bits, forward and backward.
    mean, var = c.dev("fused_mean"), c.dev("fused_variance")
    core.cuda_batch_norm_forward(x, scale, offset, mean, var, y=y, batch_mean=bm,
                                 batch_variance=bv, mean_lo=lo, axis=c.axis, epsilon=EPS,
                                 training=False, residual=res, activation=act,
                                 stream=c.stream())
    assert_same_bits(c, y, p + "y_inference")
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if res is not None else None
    ds, do = c.channels(2)
    core.cuda_batch_norm_backward(dy, x, scale, mean, var, None, dx=dx, dscale=ds, doffset=do,
                                  axis=c.axis, epsilon=EPS, training=False, offset=offset,
                                  residual=res, activation=act, dresidual=dres,
                                  stream=c.stream())
    assert_same_bits(c, dx, p + "dx_inference")
    if res is not None:
        assert_same_bits(c, dres, p + "dresidual_inference")
    # Training backward with the CPU's statistics.
    core.cuda_batch_norm_backward(dy, x, scale, c.dev(p + "mean"), c.dev(p + "variance"),
                                  c.dev(p + "mean_lo"), dx=dx, dscale=ds, doffset=do,
                                  axis=c.axis, epsilon=EPS, offset=offset, residual=res,
                                  activation=act, dresidual=dres, stream=c.stream())
    assert_close(c, dx, p + "dx")
    if res is not None:
        assert_same_bits(c, dres, p + "dresidual")
