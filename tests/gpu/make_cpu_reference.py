"""Writes tests/gpu/data/cpu_reference.npz: inputs and the CPU kernels' outputs for them,
so that the GPU kernels can be checked against the CPU kernels on a GPU machine that has no
TensorFlow (tests/gpu/test_against_cpu.py). Run it where tfbn is installed with TensorFlow:

    python tests/gpu/make_cpu_reference.py

The fused op and its epilogue come from tfbn._core (the CPU kernels on NumPy arrays), the
split family from the TensorFlow ops on the CPU. bfloat16 arrays are stored as their uint16
bits (NumPy has no bfloat16). Re-run it after a change to the CPU kernels' numbers.
"""

import os

import ml_dtypes
import numpy as np
import tensorflow as tf

from tfbn import _core
from tfbn._library import ops

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cpu_reference.npz")
LAYOUTS = {"nhwc": ((4, 5, 6, 16), -1), "nchw": ((4, 16, 5, 6), 1), "nc": ((64, 24), -1)}
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
          "float64": np.float64}
EPS = 1e-3
EMPTY = np.zeros([0], np.float32)


def stored(a):
    """An array as saved: bfloat16 as its uint16 bits."""
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


def tf_dtype(dtype):
    return {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16,
            "float64": tf.float64}[dtype]


def case(rng, dtype, shape, axis):
    t = DTYPES[dtype]
    u = np.float64 if dtype == "float64" else np.float32
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2.0 + 3.0).astype(t)
    dy = rng.standard_normal(shape).astype(t)
    residual = rng.standard_normal(shape).astype(t)
    scale = (rng.standard_normal(c) * 0.5 + 1.0).astype(u)
    offset = rng.standard_normal(c).astype(u)
    wshape = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    weights = rng.choice(np.array([0.0, 0.5, 1.0, 2.0], np.float32), size=wshape)
    out = dict(x=x, dy=dy, residual=residual, scale=scale, offset=offset, weights=weights)

    # The fused op, training and inference (with the training statistics).
    y, bm, bv, lo = _core.batch_norm_forward(x, scale, offset, axis=axis, epsilon=EPS)
    dx, ds, do = _core.batch_norm_backward(dy, x, scale, bm, bv, lo, axis=axis, epsilon=EPS)
    y_inf = _core.batch_norm_forward(x, scale, offset, bm, bv, axis=axis, epsilon=EPS,
                                     training=False)[0]
    dx_inf = _core.batch_norm_backward(dy, x, scale, bm, bv, axis=axis, epsilon=EPS,
                                       training=False)[0]
    out.update(fused_y=y, fused_mean=bm, fused_variance=bv, fused_mean_lo=lo, fused_dx=dx,
               fused_dscale=ds, fused_doffset=do, fused_y_inference=y_inf,
               fused_dx_inference=dx_inf)

    # The epilogue: relu with a residual, silu without; training, and inference with the
    # plain op's statistics.
    for act, res in (("relu", residual), ("silu", None)):
        y, bm_e, bv_e, lo_e = _core.batch_norm_forward(
            x, scale, offset, axis=axis, epsilon=EPS, residual=res, activation=act)
        grads = _core.batch_norm_backward(dy, x, scale, bm_e, bv_e, lo_e, axis=axis, epsilon=EPS,
                                          offset=offset, residual=res, activation=act)
        y_inf = _core.batch_norm_forward(x, scale, offset, bm, bv, axis=axis, epsilon=EPS,
                                         training=False, residual=res, activation=act)[0]
        g_inf = _core.batch_norm_backward(dy, x, scale, bm, bv, axis=axis, epsilon=EPS,
                                          training=False, offset=offset, residual=res,
                                          activation=act)
        p = f"epilogue_{act}_"
        out.update({p + "y": y, p + "mean": bm_e, p + "variance": bv_e, p + "mean_lo": lo_e,
                    p + "dx": grads[0], p + "dscale": grads[1], p + "doffset": grads[2],
                    p + "y_inference": y_inf, p + "dx_inference": g_inf[0]})
        if res is not None:
            out[p + "dresidual"] = grads[3]
            out[p + "dresidual_inference"] = g_inf[3]

    # The split family on the CPU ops, without and with weights.
    with tf.device("/CPU:0"):
        xt, dyt = tf.constant(x, tf_dtype(dtype)), tf.constant(dy, tf_dtype(dtype))
        for name, w in (("split_", EMPTY), ("weighted_", weights)):
            partial = ops.tfbn_batch_norm_stats(xt, w, axis=axis)
            mean, var, mlo, count = ops.tfbn_batch_norm_merge_stats(partial, U=tf.as_dtype(u))
            sums = ops.tfbn_batch_norm_grad_sums(dyt, xt, mean, mlo, axis=axis)
            dxs, dss, dos = ops.tfbn_batch_norm_grad_apply(
                dyt, xt, scale, mean, var, mlo, sums, sums, count, w, epsilon=EPS, axis=axis)
            ys = ops.tfbn_batch_norm_apply(xt, scale, offset, mean, var, mlo, epsilon=EPS,
                                           axis=axis)
            out.update({name + k: v.numpy() for k, v in dict(
                partial=partial, mean=mean, variance=var, mean_lo=mlo, count=count, sums=sums,
                dx=dxs, dscale=dss, doffset=dos, y=ys).items()})
    return out


def main():
    rng = np.random.default_rng(20261127)
    arrays = {}
    for dtype in DTYPES:
        for layout, (shape, axis) in LAYOUTS.items():
            for k, v in case(rng, dtype, shape, axis).items():
                arrays[f"{dtype}/{layout}/{k}"] = stored(v)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT}: {len(arrays)} arrays, {os.path.getsize(OUT) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
