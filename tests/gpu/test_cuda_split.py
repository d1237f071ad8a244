"""The split op family's CUDA kernels (statistics | merge | apply, gradient sums | apply)
against float64 NumPy math and against the fused CUDA op, on PyTorch device tensors (see
conftest.py); skips without a GPU.

One part merged must give the fused op's statistics bit for bit, and the apply steps fed
with them the fused op's outputs, which is what makes synchronized BatchNorm on one
replica the plain op.
"""

import numpy as np
import pytest

import reference as ref

DTYPES = ["float16", "bfloat16", "float32", "float64"]
# (shape, axis): channels-last NHWC, [N, C], planar NCHW (one with inner not a multiple of
# the vector width).
SHAPES = [
    ((3, 5, 4, 37), -1),
    ((64, 32), -1),
    ((4, 37, 5, 3), 1),
    ((2, 6, 14, 14), 1),
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in SHAPES]


def tdtype(torch, name):
    return getattr(torch, name)


def to_np(t):
    return t.detach().double().cpu().numpy()


def stat_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


def make(torch, rng, shape, dtype, loc=3.0, scale=2.0):
    x = rng.standard_normal(shape) * scale + loc
    return torch.tensor(x, dtype=torch.float64, device="cuda").to(tdtype(torch, dtype))


def params(torch, rng, c, dtype):
    u = torch.float64 if dtype == "float64" else torch.float32
    scale = torch.tensor(rng.uniform(0.5, 1.5, c), dtype=u, device="cuda")
    offset = torch.tensor(rng.standard_normal(c), dtype=u, device="cuda")
    return scale, offset


def udtype(torch, dtype):
    return torch.float64 if dtype == "float64" else torch.float32


def weight_shape(shape, axis):
    axis = axis % len(shape)
    return tuple(d for i, d in enumerate(shape) if i != axis)


def same_bits(torch, a, b):
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.shape == b.shape and torch.equal(a.view(ints[a.element_size()]),
                                              b.view(ints[b.element_size()]))


class Split:
    """The split entry points on torch tensors, allocating the outputs."""

    def __init__(self, core, torch):
        self.core, self.torch = core, torch

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream

    def partial(self, x, weights=None, axis=-1):
        p = self.torch.empty((3, x.shape[axis]), dtype=self.torch.float64, device="cuda")
        self.core.cuda_partial_moments(x, weights, partial=p, axis=axis, stream=self.stream())
        return p

    def merge(self, partials, u):
        torch = self.torch
        c = partials.shape[2]
        mean, var, lo = (torch.empty(c, dtype=u, device="cuda") for _ in range(3))
        count = torch.empty(c, dtype=torch.float64, device="cuda")
        self.core.cuda_merge_moments(partials, mean=mean, variance=var, mean_lo=lo, count=count,
                                     stream=self.stream())
        return mean, var, lo, count

    def apply(self, x, scale, offset, mean, var, lo=None, axis=-1):
        y = self.torch.empty_like(x)
        self.core.cuda_apply_statistics(x, scale, offset, mean, var, lo, y=y, axis=axis,
                                        stream=self.stream())
        return y

    def grad_sums(self, dy, x, mean, lo=None, axis=-1):
        s = self.torch.empty((2, x.shape[axis]), dtype=self.torch.float64, device="cuda")
        self.core.cuda_grad_sums(dy, x, mean, lo, sums=s, axis=axis, stream=self.stream())
        return s

    def apply_grad(self, dy, x, scale, mean, var, lo, local, glob, count, weights=None,
                   axis=-1):
        torch = self.torch
        c = x.shape[axis]
        dx = torch.empty_like(x)
        ds, do = (torch.empty(c, dtype=mean.dtype, device="cuda") for _ in range(2))
        self.core.cuda_apply_grad_with_sums(dy, x, scale, mean, var, lo, local, glob, count,
                                            weights, dx=dx, dscale=ds, doffset=do, axis=axis,
                                            stream=self.stream())
        return dx, ds, do


@pytest.fixture(scope="session")
def sp(core, torch):
    return Split(core, torch)


def weighted_moments(x, w, axis):
    """float64 weight sum, weighted mean and M2 per channel; w broadcast over channels."""
    x3 = ref.as3d(x, axis)
    w3 = w.reshape(x3.shape[0], 1, x3.shape[2])
    x3 = np.where(w3 != 0, x3, 0.0)  # masked values (NaN included) take no part
    W = w3.sum(axis=(0, 2))[0] * np.ones(x3.shape[1])
    mean = (w3 * x3).sum(axis=(0, 2)) / W
    m2 = (w3 * (x3 - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    return W, mean, m2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
def test_stats_merge_apply_match_fused(sp, bn, torch, rng, dtype, shape, axis):
    x = make(torch, rng, shape, dtype)
    scale, offset = params(torch, rng, shape[axis], dtype)
    u = udtype(torch, dtype)
    p = sp.partial(x, axis=axis)
    _, mean_ref, var_ref = ref.forward(to_np(x), axis=axis)
    m = x.numel() // shape[axis]
    np.testing.assert_array_equal(to_np(p[0]), np.full(shape[axis], m))
    ref.assert_close(to_np(p[1]), mean_ref, stat_dtype(dtype), "partial mean")
    ref.assert_close(to_np(p[2]) / m, var_ref, stat_dtype(dtype), "partial M2 / m")

    mean, var, lo, count = sp.merge(p[None], u)
    y_f, bm, bv, lo_f = bn.forward(x, scale, offset, axis=axis)
    assert same_bits(torch, mean, bm) and same_bits(torch, var, bv)
    assert same_bits(torch, lo, lo_f)
    np.testing.assert_array_equal(to_np(count), np.full(shape[axis], m))

    y = sp.apply(x, scale, offset, mean, var, lo, axis=axis)
    y_ref, _, _ = ref.forward(to_np(x), to_np(scale), to_np(offset), axis=axis)
    ref.assert_close(to_np(y), y_ref, dtype, "y")
    if dtype == "float64":  # the fused op normalizes with the variance before rounding to U
        assert same_bits(torch, y, y_f)
    # Given the same statistics, the fused op's y (inference takes no mean_lo).
    y0 = sp.apply(x, scale, offset, mean, var, None, axis=axis)
    y_inf, _, _, _ = bn.forward(x, scale, offset, mean, var, axis=axis, training=False)
    assert same_bits(torch, y0, y_inf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [SHAPES[0], SHAPES[2]], ids=[SHAPE_IDS[0], SHAPE_IDS[2]])
def test_two_part_merge(sp, torch, rng, dtype, shape, axis):
    x = make(torch, rng, shape, dtype, loc=100.0)
    half = shape[0] // 2
    parts = torch.stack([sp.partial(x[:half].contiguous(), axis=axis),
                         sp.partial(x[half:].contiguous(), axis=axis)])
    mean, var, lo, count = sp.merge(parts, udtype(torch, dtype))
    _, mean_ref, var_ref = ref.forward(to_np(x), axis=axis)
    np.testing.assert_array_equal(to_np(count), np.full(shape[axis], x.numel() // shape[axis]))
    ref.assert_close(to_np(mean) + to_np(lo), mean_ref, stat_dtype(dtype), "mean")
    ref.assert_close(to_np(var), var_ref, stat_dtype(dtype), "variance")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("rows", [2, 4])
def test_grad_sums_apply_match_fused(sp, bn, torch, rng, dtype, shape, axis, rows):
    x = make(torch, rng, shape, dtype)
    dy = make(torch, rng, shape, dtype, loc=0.5, scale=1.0)
    c = shape[axis]
    scale, _ = params(torch, rng, c, dtype)
    u = udtype(torch, dtype)
    _, bm, bv, lo = bn.forward(x, scale, axis=axis)
    dmu = dvar = None
    sums = sp.grad_sums(dy, x, bm, lo, axis=axis)
    glob = sums
    if rows == 4:
        dmu = torch.tensor(rng.standard_normal(c), dtype=u, device="cuda")
        dvar = torch.tensor(rng.standard_normal(c), dtype=u, device="cuda")
        glob = torch.cat([sums, dmu.double()[None], dvar.double()[None]]).contiguous()
    dx_f, ds_f, do_f = bn.backward(dy, x, scale, bm, bv, lo, dmu, dvar, axis=axis)

    x3, dy3 = ref.as3d(to_np(x), axis), ref.as3d(to_np(dy), axis)
    centred = (x3 - to_np(bm)[None, :, None]) - to_np(lo)[None, :, None]
    ref.assert_close(to_np(sums[0]), dy3.sum(axis=(0, 2)), stat_dtype(dtype), "sum dy")
    ref.assert_close(to_np(sums[1]), (dy3 * centred).sum(axis=(0, 2)), stat_dtype(dtype),
                     "sum dy * (x - mean)")

    _, _, _, count = sp.merge(sp.partial(x, axis=axis)[None], u)
    dx, ds, do = sp.apply_grad(dy, x, scale, bm, bv, lo, sums, glob, count, axis=axis)
    assert same_bits(torch, dx, dx_f)
    assert same_bits(torch, ds, ds_f) and same_bits(torch, do, do_f)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", ["binary", "fractional"])
def test_weighted_partial_moments(sp, torch, rng, dtype, shape, axis, kind):
    x = make(torch, rng, shape, dtype)
    ws = weight_shape(shape, axis)
    w = (rng.random(ws) < 0.6).astype(np.float32)
    if kind == "fractional":
        w *= rng.uniform(0.1, 3.0, ws).astype(np.float32)
    w.reshape(-1)[:2] = 0  # the shift comes from a later position
    w.reshape(-1)[5] = 1
    xn = x.clone()
    x3 = xn.view(ref.as3d(np.empty(shape, np.int8), axis).shape)
    x3[0, :, 0] = float("nan")  # position 0 has weight 0: must not leak
    wt = torch.tensor(w, device="cuda")
    p = sp.partial(xn, wt, axis=axis)
    W, mean_ref, m2_ref = weighted_moments(to_np(xn), w.astype(np.float64), axis)
    ref.assert_close(to_np(p[0]), W, "float64", "weight sum")
    ref.assert_close(to_np(p[1]), mean_ref, stat_dtype(dtype), "weighted mean")
    ref.assert_close(to_np(p[2]) / W, m2_ref / W, stat_dtype(dtype), "weighted M2 / W")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
def test_weighted_apply_grad(sp, torch, rng, dtype, shape, axis):
    x = make(torch, rng, shape, dtype)
    dy = make(torch, rng, shape, dtype, loc=0.5, scale=1.0)
    c = shape[axis]
    scale, _ = params(torch, rng, c, dtype)
    ws = weight_shape(shape, axis)
    w = ((rng.random(ws) < 0.7) * rng.uniform(0.2, 2.0, ws)).astype(np.float32)
    wt = torch.tensor(w, device="cuda")
    mean, var, lo, count = sp.merge(sp.partial(x, wt, axis=axis)[None], udtype(torch, dtype))
    sums = sp.grad_sums(dy, x, mean, lo, axis=axis)
    dx, ds, do = sp.apply_grad(dy, x, scale, mean, var, lo, sums, sums, count, wt, axis=axis)

    x3, dy3 = ref.as3d(to_np(x), axis), ref.as3d(to_np(dy), axis)
    w3 = w.astype(np.float64).reshape(x3.shape[0], 1, x3.shape[2])
    s, v, W = to_np(scale), to_np(var), to_np(count)
    r = 1 / np.sqrt(v + ref.op_epsilon(1e-3))
    s1, s2 = to_np(sums[0]), to_np(sums[1])
    centred = (x3 - to_np(mean)[None, :, None]) - to_np(lo)[None, :, None]
    k = lambda a: a[None, :, None]  # noqa: E731
    want = k(s * r) * dy3 + w3 * (k(-s * r ** 3 * s2 / W) * centred + k(-s * r * s1 / W))
    atol, rtol = ref.TOLERANCES[dtype]
    err = np.abs(ref.as3d(to_np(dx), axis) - want).max()
    assert err <= 4 * (atol + rtol * np.abs(want).max() + rtol * np.abs(dy3).max()), err
    ref.assert_close(to_np(do), s1, stat_dtype(dtype), "doffset")
    ref.assert_close(to_np(ds), r * s2, stat_dtype(dtype), "dscale")


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_bad_weight_gives_nan_partial(sp, torch, rng, bad):
    x = make(torch, rng, (6, 5), "float32")
    w = torch.ones(6, device="cuda")
    w[3] = bad
    p = sp.partial(x, w)
    assert torch.isnan(p).all()


@pytest.mark.parametrize("shape,axis", [SHAPES[0], SHAPES[2]], ids=[SHAPE_IDS[0], SHAPE_IDS[2]])
def test_all_weights_zero(sp, torch, rng, shape, axis):
    x = make(torch, rng, shape, "float32")
    p = sp.partial(x, torch.zeros(weight_shape(shape, axis), device="cuda"), axis=axis)
    assert not p.any()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape,axis", [((512, 70), -1), ((16, 9, 33, 9), 1)])
def test_bitwise_across_runs(sp, torch, rng, dtype, shape, axis):
    x = make(torch, rng, shape, dtype)
    dy = make(torch, rng, shape, dtype, loc=0.0, scale=1.0)
    scale, offset = params(torch, rng, shape[axis], dtype)
    w = torch.tensor(rng.uniform(0, 2, weight_shape(shape, axis)).astype(np.float32),
                     device="cuda")

    def run():
        out = [sp.partial(x, axis=axis), sp.partial(x, w, axis=axis)]
        mean, var, lo, count = sp.merge(torch.stack(out), udtype(torch, dtype))
        sums = sp.grad_sums(dy, x, mean, lo, axis=axis)
        out += [mean, var, lo, count, sums, sp.apply(x, scale, offset, mean, var, lo, axis=axis)]
        out += sp.apply_grad(dy, x, scale, mean, var, lo, sums, sums, count, axis=axis)
        out += sp.apply_grad(dy, x, scale, mean, var, lo, sums, sums, count, w, axis=axis)
        return out

    first, second = run(), run()
    assert all(same_bits(torch, a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((0, 5), -1), ((0, 5, 3), 1), ((4, 5, 0), 1)])
def test_empty_batch(sp, torch, dtype, shape, axis):
    x = torch.empty(shape, dtype=tdtype(torch, dtype), device="cuda")
    u = udtype(torch, dtype)
    c = shape[axis]
    w = torch.empty(weight_shape(shape, axis), device="cuda")
    for weights in (None, w):
        p = sp.partial(x, weights, axis=axis)
        assert not p.any()
    mean, var, lo, count = sp.merge(p[None], u)
    assert not count.any() and torch.isnan(mean).all() and torch.isnan(var).all()
    scale = torch.ones(c, dtype=u, device="cuda")
    assert sp.apply(x, scale, None, mean, var, lo, axis=axis).shape == x.shape
    sums = sp.grad_sums(x, x, mean, lo, axis=axis)
    assert not sums.any()
    for weights in (None, w):
        dx, ds, do = sp.apply_grad(x, x, scale, mean, var, lo, sums, sums, count, weights,
                                   axis=axis)
        assert dx.shape == x.shape and not ds.any() and not do.any()


def test_rejects_bad_arguments(sp, core, torch):
    x = torch.zeros((4, 3), device="cuda")
    p = torch.empty((3, 3), dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="partial"):
        core.cuda_partial_moments(x, partial=torch.empty((2, 3), dtype=torch.float64,
                                                         device="cuda"))
    with pytest.raises(ValueError, match="weights"):
        core.cuda_partial_moments(x, torch.ones(3, device="cuda"), partial=p)
    with pytest.raises(ValueError, match="partials"):
        core.cuda_merge_moments(p, mean=x[0], variance=x[0], mean_lo=x[0],
                                count=torch.empty(3, dtype=torch.float64, device="cuda"))
    with pytest.raises(ValueError, match="global_sums"):
        s = torch.zeros((2, 3), dtype=torch.float64, device="cuda")
        core.cuda_apply_grad_with_sums(
            x, x, None, x[0], x[0], None, s, torch.zeros((3, 3), dtype=torch.float64,
                                                        device="cuda"),
            torch.ones(3, dtype=torch.float64, device="cuda"), dx=torch.empty_like(x),
            dscale=x[0].clone(), doffset=x[0].clone())
