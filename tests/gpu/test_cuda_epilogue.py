"""The fused epilogue y = act(BN(x) + residual) on CUDA: forward and gradient against a
float64 NumPy reference, bitwise determinism, dresidual as the gradient the sums use, the
empty batch, and (where this _core also has the CPU entry points) the CPU's bits.

Runs on PyTorch device tensors through tfbn._core's cuda_* entry points (see conftest.py);
skips without a GPU.
"""

import numpy as np
import pytest

import reference as ref

DTYPES = ["float16", "bfloat16", "float32", "float64"]
ACTIVATIONS = ["identity", "relu", "relu6", "silu"]
# (shape, axis): NHWC, NCHW, [N, C]; odd sizes take the unvectorized paths.
LAYOUTS = [((2, 5, 3, 24), -1), ((3, 8, 5, 4), 1), ((50, 12), -1), ((3, 5, 7), 1)]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in LAYOUTS]


def to_np(t):
    return t.detach().double().cpu().numpy()


def make(torch, rng, shape, dtype, loc=0.0, scale=1.0):
    x = rng.standard_normal(shape) * scale + loc
    return torch.tensor(x, dtype=torch.float64, device="cuda").to(getattr(torch, dtype))


def params(torch, rng, c, dtype):
    u = torch.float64 if dtype == "float64" else torch.float32
    scale = torch.tensor(rng.uniform(0.5, 1.5, c), dtype=u, device="cuda")
    offset = torch.tensor(rng.standard_normal(c) * 0.5, dtype=u, device="cuda")
    return scale, offset


def stat_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def act_ref(name, z):
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "relu6":
        return np.clip(z, 0.0, 6.0)
    if name == "silu":
        return z * sigmoid(z)
    return z


def act_grad_ref(name, dy, z):
    if name == "relu":
        return np.where(z > 0, dy, 0.0)
    if name == "relu6":
        return np.where((z > 0) & (z < 6), dy, 0.0)
    if name == "silu":
        s = sigmoid(z)
        return dy * s * (1.0 + z * (1.0 - s))
    return dy


def reference(x, dy, scale, offset, res, act, axis, epsilon=1e-3):
    """float64 y, dx, dscale, doffset, dresidual of y = act(BN(x) + res), training mode."""
    x3 = ref.as3d(x, axis)
    shape3 = x3.shape
    mean = x3.mean(axis=(0, 2))[None, :, None]
    var = x3.var(axis=(0, 2))[None, :, None]
    r = 1.0 / np.sqrt(var + ref.op_epsilon(epsilon))
    xhat = (x3 - mean) * r
    s3, o3 = scale[None, :, None], offset[None, :, None]
    z = xhat * s3 + o3
    if res is not None:
        z = z + ref.as3d(res, axis)
    y = act_ref(act, z)
    dz = act_grad_ref(act, ref.as3d(dy, axis), z)
    m = shape3[0] * shape3[2]
    doffset = dz.sum(axis=(0, 2))
    dscale = (dz * xhat).sum(axis=(0, 2))
    dx = s3 * r * (dz - doffset[None, :, None] / m - xhat * dscale[None, :, None] / m)
    return y.reshape(x.shape), dx.reshape(x.shape), dscale, doffset, dz.reshape(x.shape)


class Epilogue:
    def __init__(self, core, torch):
        self.core, self.torch = core, torch

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream

    def forward(self, x, scale, offset, residual, activation, axis, training=True, mean=None,
                variance=None):
        torch = self.torch
        u = torch.float64 if x.dtype == torch.float64 else torch.float32
        c = x.shape[axis]
        y = torch.empty_like(x)
        bm, bv, lo = (torch.empty(c, dtype=u, device="cuda") for _ in range(3))
        self.core.cuda_batch_norm_forward(
            x, scale, offset, mean, variance, y=y, batch_mean=bm, batch_variance=bv, mean_lo=lo,
            axis=axis, training=training, stream=self.stream(), residual=residual,
            activation=activation)
        return y, bm, bv, lo

    def backward(self, dy, x, scale, offset, residual, activation, bm, bv, lo, axis,
                 training=True, want_dresidual=True):
        torch = self.torch
        dx = torch.empty_like(x)
        dres = torch.empty_like(x) if want_dresidual else None
        ds, do = torch.empty_like(bm), torch.empty_like(bm)
        self.core.cuda_batch_norm_backward(
            dy, x, scale, bm, bv, lo, dx=dx, dscale=ds, doffset=do, axis=axis,
            training=training, stream=self.stream(), offset=offset, residual=residual,
            activation=activation, dresidual=dres)
        return dx, ds, do, dres


@pytest.fixture(scope="module")
def epi(core, torch):
    return Epilogue(core, torch)


def inputs(torch, rng, shape, axis, dtype, with_residual):
    x = make(torch, rng, shape, dtype, loc=2.0, scale=1.5)
    dy = make(torch, rng, shape, dtype)
    res = make(torch, rng, shape, dtype) if with_residual else None
    scale, offset = params(torch, rng, shape[axis], dtype)
    return x, dy, res, scale, offset


def check_dx(got, want, dy, dtype):
    # dx is a difference of terms of size |dz|: compare on that scale
    atol, rtol = ref.TOLERANCES[dtype]
    err = np.abs(got - want).max()
    assert err <= 4 * (atol + rtol * np.abs(want).max() + rtol * np.abs(dy).max()), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_forward_backward(epi, torch, rng, dtype, with_residual, activation, shape, axis):
    x, dy, res, scale, offset = inputs(torch, rng, shape, axis, dtype, with_residual)
    y, bm, bv, lo = epi.forward(x, scale, offset, res, activation, axis)
    dx, ds, do, dres = epi.backward(dy, x, scale, offset, res, activation, bm, bv, lo, axis)
    y_ref, dx_ref, ds_ref, do_ref, dz_ref = reference(
        to_np(x), to_np(dy), to_np(scale), to_np(offset),
        None if res is None else to_np(res), activation, axis)
    ref.assert_close(to_np(y), y_ref, dtype, "y")
    tol = stat_dtype(dtype)
    dy_np = to_np(dy)
    # the sums are over m terms of size |dz|: scale the tolerance with their sum of magnitudes
    atol, rtol = ref.TOLERANCES[tol]
    mag = ref.as3d(np.abs(dy_np), axis).sum(axis=(0, 2)) * 4
    assert np.all(np.abs(to_np(do) - do_ref) <= atol + rtol * mag), "doffset"
    assert np.all(np.abs(to_np(ds) - ds_ref) <= atol + rtol * mag), "dscale"
    check_dx(to_np(dx), dx_ref, dy_np, dtype)
    ref.assert_close(to_np(dres), dz_ref, dtype, "dresidual")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("shape,axis", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_dresidual_is_dz(epi, torch, rng, dtype, activation, shape, axis):
    """For relu and relu6, dz is dy or zero exactly, as the reference's z decides."""
    x, dy, res, scale, offset = inputs(torch, rng, shape, axis, dtype, True)
    _, bm, bv, lo = epi.forward(x, scale, offset, res, activation, axis)
    _, _, _, dres = epi.backward(dy, x, scale, offset, res, activation, bm, bv, lo, axis)
    _, _, _, _, dz_ref = reference(to_np(x), to_np(dy), to_np(scale), to_np(offset), to_np(res),
                                   activation, axis)
    assert np.array_equal(to_np(dres), dz_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_zero_residual_same_bits_as_none(epi, torch, rng, dtype, activation):
    """The gradient of an epilogue without a residual equals that with a zero one."""
    shape, axis = (4, 6, 5, 16), -1
    x, dy, _, scale, offset = inputs(torch, rng, shape, axis, dtype, False)
    zero = torch.zeros_like(x)
    _, bm, bv, lo = epi.forward(x, scale, offset, zero, activation, axis)
    a = epi.backward(dy, x, scale, offset, None, activation, bm, bv, lo, axis)
    b = epi.backward(dy, x, scale, offset, zero, activation, bm, bv, lo, axis)
    assert _same_bits(torch, a, b)


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


def _run(epi, x, dy, res, scale, offset, activation, axis):
    y, bm, bv, lo = epi.forward(x, scale, offset, res, activation, axis)
    dx, ds, do, dres = epi.backward(dy, x, scale, offset, res, activation, bm, bv, lo, axis)
    return [y, bm, bv, lo, dx, ds, do, dres]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("shape,axis", [((2048, 64), -1), ((37, 130), -1), ((8, 32, 14, 14), 1),
                                        ((3, 5, 1001), 1)])
def test_bitwise_deterministic(epi, torch, rng, dtype, activation, shape, axis):
    """Two runs give the same bits; so do misaligned copies of the inputs (unvectorized)."""
    x, dy, res, scale, offset = inputs(torch, rng, shape, axis, dtype, True)
    first = _run(epi, x, dy, res, scale, offset, activation, axis)
    second = _run(epi, x, dy, res, scale, offset, activation, axis)
    assert _same_bits(torch, first, second)
    third = _run(epi, _misaligned(torch, x), _misaligned(torch, dy), _misaligned(torch, res),
                 scale, offset, activation, axis)
    assert _same_bits(torch, first, [t.contiguous() for t in third])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((0, 5), -1), ((0, 5, 3), 1), ((4, 5, 0), 1)])
def test_empty_batch(epi, torch, dtype, shape, axis):
    x = torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")
    y, bm, bv, lo = epi.forward(x, None, None, x, "relu", axis)
    assert y.shape == x.shape
    assert torch.isnan(bm).all() and torch.isnan(bv).all()
    dx, ds, do, dres = epi.backward(x, x, None, None, x, "relu", bm, bv, lo, axis)
    assert dx.shape == x.shape and dres.shape == x.shape
    assert not ds.any() and not do.any()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_inference(epi, torch, rng, activation):
    shape, axis, dtype = (6, 4, 5, 8), -1, "float32"
    x, dy, res, scale, offset = inputs(torch, rng, shape, axis, dtype, True)
    c = shape[axis]
    mean = torch.tensor(rng.standard_normal(c) + 2, dtype=torch.float32, device="cuda")
    var = torch.tensor(rng.uniform(1, 3, c), dtype=torch.float32, device="cuda")
    y, bm, bv, lo = epi.forward(x, scale, offset, res, activation, axis, training=False,
                                mean=mean, variance=var)
    dx, ds, do, dres = epi.backward(dy, x, scale, offset, res, activation, mean, var, lo, axis,
                                    training=False)
    r = 1.0 / np.sqrt(to_np(var) + ref.op_epsilon(1e-3))
    xhat = (to_np(x) - to_np(mean)) * r
    z = xhat * to_np(scale) + to_np(offset) + to_np(res)
    dz = act_grad_ref(activation, to_np(dy), z)
    ref.assert_close(to_np(y), act_ref(activation, z), dtype, "y")
    ref.assert_close(to_np(dx), dz * to_np(scale) * r, dtype, "dx")
    ref.assert_close(to_np(dres), dz, dtype, "dresidual")
    atol, rtol = ref.TOLERANCES[dtype]
    mag = np.abs(dz).reshape(-1, c).sum(0)
    assert np.all(np.abs(to_np(do) - dz.reshape(-1, c).sum(0)) <= atol + rtol * mag), "doffset"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ["relu6", "silu"])
def test_same_bits_as_cpu_in_inference(epi, torch, rng, dtype, activation):
    """Given the same statistics, y, dx and dresidual are the CPU epilogue's bits."""
    core = epi.core
    if not hasattr(core, "batch_norm_forward"):
        pytest.skip("this _core has no CPU entry points")
    shape, axis = (5, 6, 3, 20), -1
    x, dy, res, scale, offset = inputs(torch, rng, shape, axis, dtype, True)
    u = scale.dtype
    c = shape[axis]
    mean = torch.tensor(rng.standard_normal(c) + 2, dtype=u, device="cuda")
    var = torch.tensor(rng.uniform(1, 3, c), dtype=u, device="cuda")
    y, _, _, lo = epi.forward(x, scale, offset, res, activation, axis, training=False, mean=mean,
                              variance=var)
    dx, _, _, dres = epi.backward(dy, x, scale, offset, res, activation, mean, var, lo, axis,
                                  training=False)
    n = {k: v.cpu().numpy() for k, v in dict(x=x, dy=dy, res=res, scale=scale, offset=offset,
                                              mean=mean, var=var).items()}
    y_cpu = core.batch_norm_forward(n["x"], n["scale"], n["offset"], n["mean"], n["var"],
                                    axis=axis, training=False, residual=n["res"],
                                    activation=activation)[0]
    back = core.batch_norm_backward(n["dy"], n["x"], n["scale"], n["mean"], n["var"], None,
                                    axis=axis, training=False, offset=n["offset"],
                                    residual=n["res"], activation=activation)
    assert np.array_equal(y.cpu().numpy(), y_cpu)
    assert np.array_equal(dx.cpu().numpy(), back[0])
    assert np.array_equal(dres.cpu().numpy(), back[-1])


def test_rejects_unknown_activation(epi, torch):
    x = torch.zeros((4, 3), device="cuda")
    with pytest.raises(ValueError, match="gelu.*relu6"):
        epi.forward(x, None, None, None, "gelu", -1)
    y, bm, bv, lo = epi.forward(x, None, None, None, "swish", -1)  # Keras' alias of silu
    with pytest.raises(ValueError, match="tanh"):
        epi.backward(x, x, None, None, None, "tanh", bm, bv, lo, -1)
