"""Float64 NumPy reference for Batch Normalization (the numerics contract's formulas)."""

import numpy as np

# Per-dtype tolerances for |got - ref| <= atol + rtol * |ref|, where ref is float64 math
# on the same (already rounded) input values; the half types are limited by rounding y.
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-5, 2e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}


def as3d(a, axis):
    axis = axis % a.ndim
    outer = int(np.prod(a.shape[:axis], dtype=np.int64))
    inner = int(np.prod(a.shape[axis + 1 :], dtype=np.int64))
    return a.reshape(outer, a.shape[axis], inner)


def op_epsilon(epsilon):
    """The op keeps epsilon as a float32 attribute."""
    return float(np.float32(epsilon))


def forward(x, scale=None, offset=None, mean=None, variance=None, axis=-1, epsilon=1e-3,
            training=True):
    x64 = np.asarray(x).astype(np.float64)
    x3 = as3d(x64, axis)
    c = x3.shape[1]
    scale = np.ones(c) if scale is None else np.asarray(scale, np.float64)
    offset = np.zeros(c) if offset is None else np.asarray(offset, np.float64)
    if training:
        mean = x3.mean(axis=(0, 2))
        variance = x3.var(axis=(0, 2))
    else:
        mean = np.asarray(mean, np.float64)
        variance = np.asarray(variance, np.float64)
    r = 1.0 / np.sqrt(variance + op_epsilon(epsilon))
    y3 = (x3 - mean[None, :, None]) * (r * scale)[None, :, None] + offset[None, :, None]
    return y3.reshape(x64.shape), mean, variance


def backward(dy, x, scale=None, mean=None, variance=None, axis=-1, epsilon=1e-3,
             training=True):
    """Returns (dx, dscale, doffset); in training mean/variance are the batch's own."""
    x3 = as3d(np.asarray(x).astype(np.float64), axis)
    dy3 = as3d(np.asarray(dy).astype(np.float64), axis)
    c = x3.shape[1]
    scale = np.ones(c) if scale is None else np.asarray(scale, np.float64)
    if training:
        mean = x3.mean(axis=(0, 2))
        variance = x3.var(axis=(0, 2))
    r = 1.0 / np.sqrt(np.asarray(variance, np.float64) + op_epsilon(epsilon))
    xhat = (x3 - np.asarray(mean, np.float64)[None, :, None]) * r[None, :, None]
    doffset = dy3.sum(axis=(0, 2))
    dscale = (dy3 * xhat).sum(axis=(0, 2))
    if training:
        m = x3.shape[0] * x3.shape[2]
        dx3 = (scale * r)[None, :, None] * (
            dy3 - doffset[None, :, None] / m - xhat * dscale[None, :, None] / m
        )
    else:
        dx3 = (scale * r)[None, :, None] * dy3
    return dx3.reshape(np.shape(x)), dscale, doffset


def assert_close(got, ref, dtype_name, what=""):
    atol, rtol = TOLERANCES[dtype_name]
    got = np.asarray(got).astype(np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = np.abs(got - ref)
    bound = atol + rtol * np.abs(ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
    assert np.all(err <= bound), (
        f"{what} ({dtype_name}): max error {err.max():.3g} exceeds tolerance at {worst}: "
        f"got {got[worst]!r}, want {ref[worst]!r}"
    )
