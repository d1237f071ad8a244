"""The core CUDA kernels against a float64 NumPy reference and torch.nn.functional.batch_norm.

Runs on PyTorch device tensors through tfbn._core's cuda_* entry points (see conftest.py);
skips without a GPU. The layouts: channels-last ("rows", inner == 1) and planar (inner > 1),
with channel counts that are not multiples of 32 and odd sizes, which also take the
unvectorized paths, narrower loads (inner not a multiple of the vector width) and vector
groups that span two channels' planes.
"""

import numpy as np
import pytest

import reference as ref

DTYPES = ["float16", "bfloat16", "float32", "float64"]
# (shape, axis): rows layouts first, then planar ones.
SHAPES = [
    ((64, 32), -1),
    ((7, 5, 3, 37), -1),
    ((2, 9, 9, 130), -1),
    ((300, 1), -1),
    ((3, 8), -1),
    ((4, 37, 5, 3), 1),
    ((8, 64, 7, 7), 1),
    ((2, 3, 33), 1),
    ((5, 130, 17), 1),
    ((37, 4), 0),
    ((2, 3, 4, 5), 2),
    ((3, 6, 14, 14), 1),  # inner 196: half types load 4 elements at a time
    ((4, 10, 6), 1),      # inner 6: float32 loads pairs; groups straddle planes
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in SHAPES]


def tdtype(torch, name):
    return getattr(torch, name)


def to_np(t):
    return t.detach().double().cpu().numpy()


def make(torch, rng, shape, dtype, loc=3.0, scale=2.0):
    x = rng.standard_normal(shape) * scale + loc
    return torch.tensor(x, dtype=torch.float64, device="cuda").to(tdtype(torch, dtype))


def params(torch, rng, c, dtype):
    u = torch.float64 if dtype == "float64" else torch.float32
    scale = torch.tensor(rng.uniform(0.5, 1.5, c), dtype=u, device="cuda")
    offset = torch.tensor(rng.standard_normal(c), dtype=u, device="cuda")
    return scale, offset


def stat_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
def test_forward_training(bn, torch, rng, dtype, shape, axis):
    x = make(torch, rng, shape, dtype)
    c = shape[axis]
    scale, offset = params(torch, rng, c, dtype)
    y, bm, bv, res = bn.forward(x, scale, offset, axis=axis)
    y_ref, mean_ref, var_ref = ref.forward(to_np(x), to_np(scale), to_np(offset), axis=axis)
    ref.assert_close(to_np(y), y_ref, dtype, "y")
    ref.assert_close(to_np(bm), mean_ref, stat_dtype(dtype), "batch_mean")
    ref.assert_close(to_np(bv), var_ref, stat_dtype(dtype), "batch_variance")
    # reserve is the residual of the mean's rounding: hi + lo is the mean to double-ish
    ref.assert_close(to_np(bm) + to_np(res), mean_ref, "float64" if dtype == "float64"
                     else "float32", "batch_mean + reserve")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
def test_backward_training(bn, torch, rng, dtype, shape, axis):
    x = make(torch, rng, shape, dtype)
    dy = make(torch, rng, shape, dtype, loc=0.5, scale=1.0)
    c = shape[axis]
    scale, offset = params(torch, rng, c, dtype)
    _, bm, bv, res = bn.forward(x, scale, offset, axis=axis)
    dx, ds, do = bn.backward(dy, x, scale, bm, bv, res, axis=axis)
    dx_ref, ds_ref, do_ref = ref.backward(to_np(dy), to_np(x), to_np(scale), axis=axis)
    tol = stat_dtype(dtype)
    ref.assert_close(to_np(do), do_ref, tol, "doffset")
    ref.assert_close(to_np(ds), ds_ref, tol, "dscale")
    # dx is a difference of terms of size |dy|: compare on that scale
    atol, rtol = ref.TOLERANCES[dtype]
    err = np.abs(to_np(dx) - dx_ref).max()
    assert err <= 4 * (atol + rtol * np.abs(dx_ref).max() + rtol * np.abs(to_np(dy)).max()), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [SHAPES[1], SHAPES[5]], ids=[SHAPE_IDS[1], SHAPE_IDS[5]])
def test_backward_folds_statistics_gradients(bn, torch, rng, dtype, shape, axis):
    x = make(torch, rng, shape, dtype)
    dy = make(torch, rng, shape, dtype, loc=0.0, scale=1.0)
    c = shape[axis]
    scale, _ = params(torch, rng, c, dtype)
    u = scale.dtype
    dmu = torch.tensor(rng.standard_normal(c), dtype=u, device="cuda")
    dvar = torch.tensor(rng.standard_normal(c), dtype=u, device="cuda")
    _, bm, bv, res = bn.forward(x, scale, axis=axis)
    dx, _, _ = bn.backward(dy, x, scale, bm, bv, res, dmu, dvar, axis=axis)
    dx0, _, _ = ref.backward(to_np(dy), to_np(x), to_np(scale), axis=axis)
    x3 = ref.as3d(to_np(x), axis)
    m = x3.shape[0] * x3.shape[2]
    mean = x3.mean(axis=(0, 2))
    extra = (to_np(dmu)[None, :, None] / m
             + 2 * to_np(dvar)[None, :, None] * (x3 - mean[None, :, None]) / m)
    want = dx0 + extra.reshape(dx0.shape)
    atol, rtol = ref.TOLERANCES[dtype]
    err = np.abs(to_np(dx) - want).max()
    assert err <= 4 * (atol + rtol * np.abs(want).max()), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [SHAPES[2], SHAPES[6]], ids=[SHAPE_IDS[2], SHAPE_IDS[6]])
def test_inference(bn, torch, rng, dtype, shape, axis):
    x = make(torch, rng, shape, dtype)
    dy = make(torch, rng, shape, dtype, loc=0.0, scale=1.0)
    c = shape[axis]
    scale, offset = params(torch, rng, c, dtype)
    u = scale.dtype
    mean = torch.tensor(rng.standard_normal(c) + 3, dtype=u, device="cuda")
    var = torch.tensor(rng.uniform(1, 5, c), dtype=u, device="cuda")
    y, bm, bv, res = bn.forward(x, scale, offset, mean, var, axis=axis, training=False)
    y_ref, _, _ = ref.forward(to_np(x), to_np(scale), to_np(offset), to_np(mean), to_np(var),
                              axis=axis, training=False)
    ref.assert_close(to_np(y), y_ref, dtype, "y")
    assert torch.equal(bm, mean) and torch.equal(bv, var)
    assert not res.any()
    dx, ds, do = bn.backward(dy, x, scale, mean, var, axis=axis, training=False)
    dx_ref, ds_ref, do_ref = ref.backward(to_np(dy), to_np(x), to_np(scale), to_np(mean),
                                          to_np(var), axis=axis, training=False)
    ref.assert_close(to_np(dx), dx_ref, dtype, "dx")
    ref.assert_close(to_np(ds), ds_ref, stat_dtype(dtype), "dscale")
    ref.assert_close(to_np(do), do_ref, stat_dtype(dtype), "doffset")


def test_accurate_far_from_zero(bn, torch, rng):
    """x = 1e4 + N(0, 1) in float32: the statistics keep float32's precision."""
    x = make(torch, rng, (512, 64, 9), "float32", loc=1e4, scale=1.0)
    y, bm, bv, _ = bn.forward(x, axis=1)
    y_ref, mean_ref, var_ref = ref.forward(to_np(x), axis=1)
    assert np.abs(to_np(y) - y_ref).max() < 5e-6
    assert np.abs(to_np(bv) / var_ref - 1).max() < 1e-6
    x2 = x.permute(0, 2, 1).contiguous()  # the same data channels-last
    y2, bm2, bv2, _ = bn.forward(x2, axis=-1)
    assert np.abs(to_np(y2.permute(0, 2, 1)) - y_ref).max() < 5e-6
    assert np.abs(to_np(bv2) / var_ref - 1).max() < 1e-6


@pytest.mark.xfail(strict=True, reason="no second pass on the GPU yet: the sums shift by each "
                   "channel's first sample, and the CPU's re-summing about the mean where that "
                   "sample lies more than 8 standard deviations out (ShiftTooFar) is CPU-only")
@pytest.mark.parametrize("outlier", [1e2, 1e3, 1e5])
def test_variance_keeps_precision_when_first_sample_is_an_outlier(bn, torch, outlier):
    """tests/test_ops.py's CPU case: float32 N(0, 1) whose first row is an outlier. Emulating
    the rows kernel's float32 stretches of 32 in NumPy gives a variance off by 2e-5 (1e2)
    to 4e-4 (1e3), against the CPU's 2e-6."""
    x = np.random.default_rng(0).normal(size=(200000, 4)).astype(np.float32)
    x[0] = outlier
    _, mean, var, _ = bn.forward(torch.tensor(x, device="cuda"))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(to_np(var), x64.var(0), rtol=2e-6)
    np.testing.assert_allclose(to_np(mean), x64.mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
def test_against_torch(bn, torch, rng, dtype, memory_format):
    """Forward, backward and running statistics against F.batch_norm (cuDNN)."""
    F = torch.nn.functional
    n, c, h, w = 6, 48, 7, 5
    eps, momentum = 1e-5, 0.1
    x_nchw = make(torch, rng, (n, c, h, w), dtype)
    dy_nchw = make(torch, rng, (n, c, h, w), dtype, loc=0.0, scale=1.0)
    scale, offset = params(torch, rng, c, dtype)
    rm = torch.tensor(rng.standard_normal(c), dtype=torch.float32, device="cuda")
    rv = torch.tensor(rng.uniform(1, 2, c), dtype=torch.float32, device="cuda")
    fmt = getattr(torch, "channels_last" if memory_format == "channels_last"
                  else "contiguous_format")
    # a copy: for the contiguous format, .contiguous() is x_nchw itself, which must not
    # become a tensor that requires grad (such tensors cannot be exported)
    xt = x_nchw.clone().contiguous(memory_format=fmt).requires_grad_(True)
    wt = scale.clone().requires_grad_(True)
    bt = offset.clone().requires_grad_(True)
    rm_t, rv_t = rm.clone(), rv.clone()
    yt = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, momentum=momentum, eps=eps)
    yt.backward(dy_nchw.contiguous(memory_format=fmt))

    if memory_format == "channels_last":  # the same bytes, viewed [N*H*W, C]
        x = x_nchw.permute(0, 2, 3, 1).contiguous()
        dy = dy_nchw.permute(0, 2, 3, 1).contiguous()
        axis = -1

        def back(t):
            return t.permute(0, 3, 1, 2)
    else:
        x, dy, axis = x_nchw.contiguous(), dy_nchw.contiguous(), 1

        def back(t):
            return t
    y, bm, bv, res = bn.forward(x, scale, offset, axis=axis, epsilon=eps)
    dx, ds, do = bn.backward(dy, x, scale, bm, bv, res, axis=axis, epsilon=eps)
    m = n * h * w
    rm_ours = (1 - momentum) * rm + momentum * bm
    rv_ours = (1 - momentum) * rv + momentum * bv * (m / (m - 1))  # torch: unbiased

    atol, rtol = ref.TOLERANCES[dtype]

    def close(a, b, what, scale_of=None):
        a, b = to_np(a), to_np(b)
        s = np.abs(b).max() if scale_of is None else scale_of
        err = np.abs(a - b).max()
        assert err <= 2 * (atol + rtol * s), f"{what}: {err}"
    close(back(y), yt, "y")
    close(back(dx), xt.grad, "dx", np.abs(to_np(dy)).max())
    ref.assert_close(to_np(rm_ours), to_np(rm_t), "float32", "running_mean")
    ref.assert_close(to_np(rv_ours), to_np(rv_t), "float32", "running_var")
    # dscale and doffset: tfbn's within its float32 tolerance of float64; torch's
    # contiguous half kernels round these sums to the half type, so against torch the check
    # is that tfbn is no further from float64 than torch is (plus float32 rounding)
    _, ds_ref, do_ref = ref.backward(to_np(dy), to_np(x), to_np(scale), axis=axis,
                                     epsilon=eps)
    for ours, theirs, want, what in ((do, bt.grad, do_ref, "doffset"),
                                     (ds, wt.grad, ds_ref, "dscale")):
        ref.assert_close(to_np(ours), want, "float32", what)
        err_ours = np.abs(to_np(ours) - want).max()
        err_torch = np.abs(to_np(theirs) - want).max()
        assert err_ours <= err_torch + 1e-4 * np.abs(want).max(), (what, err_ours, err_torch)


def _run_all(bn, x, dy, scale, offset, axis):
    y, bm, bv, res = bn.forward(x, scale, offset, axis=axis)
    dx, ds, do = bn.backward(dy, x, scale, bm, bv, res, axis=axis)
    return [y, bm, bv, res, dx, ds, do]


def _misaligned(torch, t):
    """A copy of t one element past an aligned address: no vector loads apply."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _same_bits(torch, a, b):
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return all(torch.equal(p.view(ints[p.element_size()]), q.view(ints[q.element_size()]))
               for p, q in zip(a, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4096, 64), -1), ((37, 130), -1), ((16, 64, 33, 9), 1),
                                        ((3, 5, 1001), 1), ((64, 16, 14, 14), 1)])
def test_bitwise_deterministic(bn, torch, rng, dtype, shape, axis):
    """Two runs give the same bits; so does a misaligned copy of the inputs, which takes
    the unvectorized paths (the summation order does not depend on vector loads)."""
    x = make(torch, rng, shape, dtype)
    dy = make(torch, rng, shape, dtype, loc=0.0, scale=1.0)
    scale, offset = params(torch, rng, shape[axis], dtype)
    first = _run_all(bn, x, dy, scale, offset, axis)
    second = _run_all(bn, x, dy, scale, offset, axis)
    assert _same_bits(torch, first, second)

    third = _run_all(bn, _misaligned(torch, x), _misaligned(torch, dy), scale, offset, axis)
    assert _same_bits(torch, first, [t.contiguous() for t in third])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((0, 5), -1), ((0, 5, 3), 1), ((4, 5, 0), 1)])
def test_empty_batch(bn, torch, dtype, shape, axis):
    x = torch.empty(shape, dtype=tdtype(torch, dtype), device="cuda")
    y, bm, bv, res = bn.forward(x, axis=axis)
    assert y.shape == x.shape
    assert torch.isnan(bm).all() and torch.isnan(bv).all()
    dx, ds, do = bn.backward(x, x, None, bm, bv, res, axis=axis)
    assert dx.shape == x.shape
    assert not ds.any() and not do.any()


def test_rejects_bad_arguments(bn, torch):
    x = torch.zeros((4, 3), device="cuda")
    with pytest.raises(ValueError, match="scale must be a float32 vector of length C = 3"):
        bn.forward(x, torch.ones(4, device="cuda"))
    with pytest.raises(ValueError, match="rank >= 2"):
        bn.forward(torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="C-contiguous"):
        bn.forward(torch.zeros((3, 4), device="cuda").t())
    with pytest.raises(ValueError, match="not CUDA device memory|CUDA device tensor"):
        bn.forward(torch.zeros((4, 3)))


def _large_case(torch, shape, axis, dtype=None):
    dtype = dtype or torch.bfloat16
    need = 3 * int(np.prod(shape)) * 2 + (6 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need >> 30} GiB of free GPU memory, {free >> 30} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(shape, dtype=dtype, device="cuda", generator=gen).mul_(2).add_(3)
    return x, gen


def _channel_sums(torch, t, axis, fn):
    """Per-channel float64 sums of fn(chunk) without a float64 copy of the whole tensor."""
    dims = [d for d in range(t.dim()) if d != axis % t.dim()]
    split_dim = max(dims, key=lambda d: t.shape[d])
    total = 0
    for chunk in t.split(max(1, t.shape[split_dim] // 16), dim=split_dim):
        total = total + fn(chunk.double()).sum(dim=dims)
    return total


@pytest.mark.parametrize("shape,axis", [((2 ** 31 // 64 + 1, 64), -1),
                                        ((2, 2, 2 ** 29 + 16), 1)],
                         ids=["rows", "planar"])
def test_over_2_pow_31_elements(bn, torch, shape, axis):
    x, gen = _large_case(torch, shape, axis)
    assert x.numel() > 2 ** 31
    c = shape[axis]
    y, bm, bv, res = bn.forward(x, axis=axis)
    m = x.numel() // c
    mean = _channel_sums(torch, x, axis, lambda t: t) / m
    bshape = [1] * x.dim()
    bshape[axis] = c
    mb = mean.view(bshape)
    var = _channel_sums(torch, x, axis, lambda t: (t - mb) ** 2) / m
    assert np.allclose(to_np(bm), to_np(mean), rtol=1e-5, atol=1e-5)
    assert np.allclose(to_np(bv), to_np(var), rtol=1e-5, atol=1e-5)
    r = 1.0 / torch.sqrt(var + ref.op_epsilon(1e-3))
    # y at the first and the last elements (past 2^31) against the formula
    flat_x, flat_y = x.view(-1), y.view(-1)
    idx = torch.cat([torch.arange(0, 4096, device="cuda"),
                     torch.arange(x.numel() - 4096, x.numel(), device="cuda")])
    inner = int(np.prod(shape[axis % len(shape) + 1:]))
    ch = (idx // inner) % c
    want = (flat_x[idx].double() - mean[ch]) * r[ch]
    assert (flat_y[idx].double() - want).abs().max().item() < 2e-2
    del y
    dy = torch.randn(shape, dtype=x.dtype, device="cuda", generator=gen)
    dx, ds, do = bn.backward(dy, x, None, bm, bv, res, axis=axis)
    do_ref = _channel_sums(torch, dy, axis, lambda t: t)
    ds_ref = torch.zeros(c, dtype=torch.float64, device="cuda")  # sum(dy * (x - mean))
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    split_dim = max(dims, key=lambda d: x.shape[d])
    n = max(1, x.shape[split_dim] // 16)
    for a, b in zip(dy.split(n, dim=split_dim), x.split(n, dim=split_dim)):
        ds_ref = ds_ref + (a.double() * (b.double() - mb)).sum(dim=dims)
    ds_ref = ds_ref * r
    assert np.allclose(to_np(do), to_np(do_ref), rtol=1e-4, atol=1e-2 * m ** 0.5 * 1e-3)
    assert np.allclose(to_np(ds), to_np(ds_ref), rtol=1e-4, atol=1e-2 * m ** 0.5 * 1e-3)
    want = r[ch] * (dy.view(-1)[idx].double() - do_ref[ch] / m
                    - (flat_x[idx].double() - mean[ch]) * r[ch] * ds_ref[ch] / m)
    assert (dx.view(-1)[idx].double() - want).abs().max().item() < 3e-2


def test_planes_with_a_block_per_channel(bn, torch, rng):
    """A planar tensor large enough that each channel gets whole blocks of threads (small
    ones share a block between several channels): against float64, and the same bits from
    a misaligned copy (scalar loads)."""
    shape, axis = (2, 64, 512, 512), 1
    x = make(torch, rng, shape, "float32")
    dy = make(torch, rng, shape, "float32", loc=0.0, scale=1.0)
    scale, offset = params(torch, rng, shape[axis], "float32")
    first = _run_all(bn, x, dy, scale, offset, axis)
    y, bm, bv, _, dx, ds, do = first
    y_ref, mean_ref, var_ref = ref.forward(to_np(x), to_np(scale), to_np(offset), axis=axis)
    ref.assert_close(to_np(bm), mean_ref, "float32", "batch_mean")
    ref.assert_close(to_np(bv), var_ref, "float32", "batch_variance")
    assert np.abs(to_np(y) - y_ref).max() < 1e-4
    _, ds_ref, do_ref = ref.backward(to_np(dy), to_np(x), to_np(scale), axis=axis)
    # sums of 2^19 float32 terms that cancel to near zero: bound the error by the terms'
    # magnitudes (1e-8 of the sum of |term|, far tighter than plain float32 summation)
    dy3, x3 = ref.as3d(to_np(dy), axis), ref.as3d(to_np(x), axis)
    xhat = (x3 - mean_ref[None, :, None]) / np.sqrt(var_ref + ref.op_epsilon(1e-3))[None, :, None]
    for got, want, terms, what in ((do, do_ref, np.abs(dy3), "doffset"),
                                   (ds, ds_ref, np.abs(dy3 * xhat), "dscale")):
        err = np.abs(to_np(got) - want)
        assert np.all(err <= 1e-8 * terms.sum(axis=(0, 2)) + 2e-5 * np.abs(want)), (what,
                                                                                     err.max())

    third = _run_all(bn, _misaligned(torch, x), _misaligned(torch, dy), scale, offset, axis)
    assert _same_bits(torch, first, [t.contiguous() for t in third])
