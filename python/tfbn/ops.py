"""Python API of the fused op, and its first- and second-order gradients."""

import math

import numpy as np
import tensorflow as tf

from ._library import ops as _ops

_DATA_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def param_dtype(x_dtype):
    """Statistics and parameters: float64 for float64 data, float32 otherwise."""
    return tf.float64 if x_dtype == tf.float64 else tf.float32


_EAGER_EMPTY = {}


def _empty(dtype):
    """An empty per-channel vector (the op reads empty scale/offset as 1/0, and empty
    statistics as unused). Eagerly, one cached tensor per dtype saves an op per call."""
    if not tf.executing_eagerly():
        return tf.zeros([0], dtype)
    if dtype not in _EAGER_EMPTY:
        _EAGER_EMPTY[dtype] = tf.zeros([0], dtype)
    return _EAGER_EMPTY[dtype]


def _check_epsilon(epsilon):
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        raise TypeError(
            f"tfbn.batch_norm: epsilon must be a number, got epsilon={epsilon!r}") from None
    # The op keeps epsilon as a float32 attribute: it must stay positive and finite there.
    with np.errstate(over="ignore", under="ignore"):
        eps32 = np.float32(eps) if math.isfinite(eps) else np.float32("nan")
    if not (eps > 0 and np.isfinite(eps32) and eps32 > 0):
        raise ValueError(
            f"tfbn.batch_norm: epsilon must be positive and finite, got epsilon={epsilon!r} "
            f"(it is kept as a float32)"
        )
    return eps


def _op_activations():
    """The activation attribute's values: the names of cc/core/activation.h."""
    from tensorflow.python.framework import op_def_registry

    attr = next(a for a in op_def_registry.get("TfbnBatchNorm").attr if a.name == "activation")
    return [tf.compat.as_str(name) for name in attr.allowed_values.list.s]


# The fused epilogue's activations: accepted names -> the op's attribute value. Besides
# the op's names: None, and Keras' other spellings 'linear' and 'swish'.
_ACTIVATIONS = {
    None: "identity", "linear": "identity", **{n: n for n in _op_activations()}, "swish": "silu",
}


def canonical_activation(activation, where="tfbn.batch_norm"):
    """The op's name for `activation` (None, 'linear' and 'identity' are 'identity';
    'swish' is Keras' name for 'silu'); a clear ValueError for anything else."""
    if activation is None or (isinstance(activation, str) and activation in _ACTIVATIONS):
        return _ACTIVATIONS[activation]
    names = [repr(name) for name in _ACTIVATIONS]
    raise ValueError(
        f"{where}: activation must be {', '.join(names[:-1])} or {names[-1]}, "
        f"got activation={activation!r}"
    )


def apply_activation(z, activation):
    """TensorFlow's own op for `activation` (a canonical name): the composite epilogue.
    identity returns z itself (no op)."""
    if activation == "identity":
        return z
    return {"relu": tf.nn.relu, "relu6": tf.nn.relu6, "silu": tf.nn.silu}[activation](z)


def _check_residual(residual, x):
    if residual is None:
        return None
    residual = tf.convert_to_tensor(residual)
    if residual.dtype != x.dtype:
        raise TypeError(
            f"tfbn.batch_norm: residual must have x's dtype {x.dtype.name}, got residual of "
            f"dtype {residual.dtype.name}"
        )
    if not residual.shape.is_compatible_with(x.shape):
        raise ValueError(
            f"tfbn.batch_norm: residual must have the shape of x {x.shape}, got residual of "
            f"shape {residual.shape}"
        )
    return residual


def _check_param(value, name, x, dtype):
    if value is None:
        return None
    value = tf.convert_to_tensor(value)
    if value.dtype != dtype:
        raise TypeError(
            f"tfbn.batch_norm: {name} must be {dtype.name} for x of dtype {x.dtype.name}, "
            f"got {name} of dtype {value.dtype.name}"
        )
    return value


def batch_norm(
    x,
    scale=None,
    offset=None,
    mean=None,
    variance=None,
    *,
    axis=-1,
    epsilon=1e-3,
    training=True,
    synchronized=False,
    residual=None,
    activation=None,
    name=None,
):
    """Fused Batch Normalization over channel `axis` of `x` (rank >= 2).

    Returns `(y, batch_mean, batch_variance)`. In training the statistics are those of the
    batch (biased variance) and `mean`/`variance` are ignored; in inference `mean` and
    `variance` are required and returned as given. `scale`/`offset` None mean 1/0.
    Static shapes are checked when the graph is built, dynamic ones when the op runs.
    x is float16, bfloat16, float32 or float64; the other arguments are float32
    (float64 for float64 x).

    `synchronized=True` (training only), called inside `strategy.run` of a
    tf.distribute strategy with several replicas, normalizes with the statistics of the
    global batch (all replicas' slices together) and returns those; see
    `tfbn.distributed`. Elsewhere it is the same as `synchronized=False`.

    Fused epilogue: `y = activation(BN(x) + residual)` in one pass, computed in the
    statistics' precision and rounded to x's dtype once. `residual` (None: no residual)
    has x's dtype and shape; `activation` is None (same as 'linear' / 'identity'),
    'relu', 'relu6' or 'silu' ('swish'). The gradient recomputes the pre-activation from
    x and the statistics, so nothing beyond the outputs is stored; it returns a gradient
    for `residual` too. The batch statistics returned are those of x. With
    `synchronized=True` under a strategy the epilogue runs as TensorFlow ops after the
    synchronized normalization.
    """
    with tf.name_scope(name or "tfbn_batch_norm"):
        x = tf.convert_to_tensor(x)
        if x.dtype not in _DATA_DTYPES:
            raise TypeError(
                "tfbn.batch_norm: x must be float16, bfloat16, float32 or float64, "
                f"got x of dtype {x.dtype.name}"
            )
        if not isinstance(training, (bool, np.bool_)):
            raise TypeError(
                f"tfbn.batch_norm: training must be a Python bool, got training={training!r}"
            )
        training = bool(training)
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise TypeError(f"tfbn.batch_norm: axis must be an int, got axis={axis!r}")
        axis = int(axis)
        eps = _check_epsilon(epsilon)
        activation = canonical_activation(activation)
        residual = _check_residual(residual, x)
        dtype = param_dtype(x.dtype)
        scale = _check_param(scale, "scale", x, dtype)
        offset = _check_param(offset, "offset", x, dtype)
        mean = _check_param(mean, "mean", x, dtype)
        variance = _check_param(variance, "variance", x, dtype)
        if not training and (mean is None or variance is None):
            raise ValueError(
                "tfbn.batch_norm: mean and variance are required when training=False "
                f"(got mean={'None' if mean is None else 'a tensor'}, "
                f"variance={'None' if variance is None else 'a tensor'})"
            )
        rank = x.shape.rank
        if rank is not None and rank < 2:
            raise ValueError(
                f"tfbn.batch_norm: x must have rank >= 2, got shape {x.shape} (rank {rank})"
            )
        if rank is not None and not -rank <= axis < rank:
            raise ValueError(
                f"tfbn.batch_norm: axis={axis} is out of range for x of rank {rank} "
                f"(shape {x.shape})"
            )
        if training and synchronized:
            from . import distributed, split

            ctx = distributed.replica_context()
            if ctx is not None:
                y, batch_mean, batch_variance = split.split_batch_norm(
                    x, scale, offset, axis=axis, epsilon=eps, ctx=ctx
                )
                if residual is not None:
                    y = y + residual
                return apply_activation(y, activation), batch_mean, batch_variance
        # A missing scale/offset goes to the op as an empty vector (read as 1/0); a given
        # one must have C entries (has_scale/has_offset tell the op which is which).
        has_scale, has_offset = scale is not None, offset is not None
        empty = _empty(dtype)
        scale = empty if scale is None else scale
        offset = empty if offset is None else offset
        if training:  # the op ignores given statistics in training
            mean = variance = empty
        has_residual = residual is not None
        y, batch_mean, batch_variance, _ = _ops.tfbn_batch_norm(
            x, scale, offset, mean, variance, residual if has_residual else _empty(x.dtype),
            epsilon=eps, axis=axis, is_training=training, has_scale=has_scale,
            has_offset=has_offset, activation=activation, has_residual=has_residual,
        )
        return y, batch_mean, batch_variance


def _attrs(op):
    keys = ("epsilon", "axis", "is_training", "activation", "has_residual")
    attrs = {k: op.get_attr(k) for k in keys}
    attrs["activation"] = tf.compat.as_str(attrs["activation"])
    return attrs


def _zeros_if_none(grad, like):
    return tf.zeros_like(like) if grad is None else grad


def _present(v):
    """v, or None where the op got an empty per-channel input (statically empty)."""
    return None if (v.shape.rank == 1 and v.shape[0] == 0) else v


@tf.RegisterGradient("TfbnBatchNorm")
def _batch_norm_grad(op, dy, d_batch_mean, d_batch_variance, _d_mean_lo):
    x, scale, offset, mean, variance, residual = op.inputs
    attrs = _attrs(op)
    keep_dresidual = attrs["has_residual"]
    # A missing scale/offset (an empty one standing for 1/0) gets no gradient.
    keep_dscale = op.get_attr("has_scale")
    keep_doffset = op.get_attr("has_offset")
    dy = _zeros_if_none(dy, x)
    empty = _empty(scale.dtype)
    if attrs["is_training"]:
        # The op's statistics outputs depend on x: their gradients are folded into dx.
        _, batch_mean, batch_variance, mean_lo = op.outputs
        dx, dscale, doffset, dresidual = _ops.tfbn_batch_norm_grad(
            dy, x, scale, offset, batch_mean, batch_variance, mean_lo, residual,
            empty if d_batch_mean is None else d_batch_mean,
            empty if d_batch_variance is None else d_batch_variance,
            **attrs,
        )
        return (dx, dscale if keep_dscale else None, doffset if keep_doffset else None,
                None, None, dresidual if keep_dresidual else None)
    dx, dscale, doffset, dresidual = _ops.tfbn_batch_norm_grad(
        dy, x, scale, offset, mean, variance, empty, residual, empty, empty, **attrs
    )
    # y = (x - mean) * r * scale + offset with r = rsqrt(variance + eps); the statistics
    # outputs are the inputs passed through.
    r = tf.math.rsqrt(variance + tf.cast(attrs["epsilon"], variance.dtype))
    sr = scale * r if keep_dscale else r
    dmean = -sr * doffset
    dvariance = -0.5 * sr * r * dscale
    if d_batch_mean is not None:
        dmean += d_batch_mean
    if d_batch_variance is not None:
        dvariance += d_batch_variance
    return (dx, dscale if keep_dscale else None, doffset if keep_doffset else None,
            dmean, dvariance, dresidual if keep_dresidual else None)


def _as_3d(t, axis):
    """[outer, C, inner] view of t (as the op sees it)."""
    shape = tf.shape(t, out_type=tf.int64)
    outer = tf.reduce_prod(shape[:axis])
    inner = tf.reduce_prod(shape[axis + 1 :])
    return tf.reshape(t, tf.stack([outer, shape[axis], inner]))


def _activation_grad(dy, z, activation):
    """dy * act'(z) as differentiable TensorFlow ops, with TensorFlow's conventions at the
    kinks (relu: dy where z > 0; relu6: where 0 < z < 6)."""
    zero = tf.zeros_like(dy)
    if activation == "relu":
        return tf.where(z > 0, dy, zero)
    if activation == "relu6":
        return tf.where((z > 0) & (z < 6), dy, zero)
    if activation == "silu":
        s = tf.sigmoid(z)
        return dy * s * (1 + z * (1 - s))
    return dy


def _composite_backward(dy, x, scale, mean, variance, d_mean, d_var, epsilon, axis, training,
                        offset=None, residual=None, activation="identity"):
    """The backward formula as differentiable TensorFlow ops (for second-order grads).

    In training, mean and variance are recomputed from x so that their dependence on x
    is part of the derivative. With an epilogue, z = BN(x) + residual is recomputed too
    and dz = dy * act'(z) takes dy's place; the fourth output is dresidual = dz.
    """
    dtype = mean.dtype
    x3 = _as_3d(tf.cast(x, dtype), axis)
    dy3 = _as_3d(tf.cast(dy, dtype), axis)
    col = lambda v: v[None, :, None]  # noqa: E731
    eps = tf.cast(epsilon, dtype)
    if training:
        mean = tf.reduce_mean(x3, axis=[0, 2])
        variance = tf.reduce_mean(tf.square(x3 - col(mean)), axis=[0, 2])
    r = tf.math.rsqrt(variance + eps)
    if training:  # an empty batch has NaN statistics; its gradients are zero, as the op's
        r = tf.where(tf.size(x3) > 0, r, tf.zeros_like(r))
    sr = r if scale is None else scale * r
    xc = x3 - col(mean)
    xhat = xc * col(r)
    if activation != "identity":
        z3 = xc * col(sr)
        if offset is not None:
            z3 += col(offset)
        if residual is not None:
            z3 += _as_3d(tf.cast(residual, dtype), axis)
        dy3 = _activation_grad(dy3, z3, activation)
    dresidual = tf.cast(tf.reshape(dy3, tf.shape(x)), x.dtype)
    doffset = tf.reduce_sum(dy3, axis=[0, 2])
    dscale = tf.reduce_sum(dy3 * xhat, axis=[0, 2])
    if training:
        m = tf.cast(tf.shape(x3)[0] * tf.shape(x3)[2], dtype)
        dx3 = col(sr) * (dy3 - col(doffset / m) - xhat * col(dscale / m))
        if d_mean is not None:
            dx3 += col(d_mean / m)
        if d_var is not None:
            dx3 += col(2.0 * d_var / m) * xc
    else:
        dx3 = col(sr) * dy3
    dx = tf.cast(tf.reshape(dx3, tf.shape(x)), x.dtype)
    return dx, dscale, doffset, dresidual


@tf.RegisterGradient("TfbnBatchNormGrad")
def _batch_norm_grad_grad(op, ddx, ddscale, ddoffset, ddresidual):
    dy, x, scale, offset, mean, variance, _mean_lo, residual, d_mean, d_var = op.inputs
    attrs = _attrs(op)
    training = attrs["is_training"]
    activation = attrs["activation"]
    axis = attrs["axis"]
    if x.shape.rank is None:
        raise ValueError("tfbn: second-order gradients need x of known rank")
    if axis < 0:
        axis += x.shape.rank
    d_mean, d_var = (_present(d_mean), _present(d_var)) if training else (None, None)
    scale = _present(scale)
    offset = _present(offset)
    residual = residual if attrs["has_residual"] else None
    extra = [v for v in (offset, residual) if v is not None]
    sources = [dy, x] + ([scale] if scale is not None else [])
    if training:
        sources += [v for v in (d_mean, d_var) if v is not None]
    else:
        sources += [mean, variance]
    sources += extra
    with tf.GradientTape() as tape:
        tape.watch(sources)
        dx, dscale, doffset, dresidual = _composite_backward(
            dy, x, scale, mean, variance, d_mean, d_var, attrs["epsilon"], axis, training,
            offset=offset, residual=residual, activation=activation,
        )
    outputs = [dx, dscale, doffset]
    upstream = [ddx, ddscale, ddoffset]
    if residual is not None:
        outputs.append(dresidual)
        upstream.append(ddresidual)
    upstream = [_zeros_if_none(g, o) for g, o in zip(upstream, outputs)]
    grads = iter(tape.gradient(outputs, sources, output_gradients=upstream))
    g_dy, g_x = next(grads), next(grads)
    g_scale = next(grads) if scale is not None else None
    if training:
        g_dmean = next(grads) if d_mean is not None else None
        g_dvar = next(grads) if d_var is not None else None
        g_mean = g_var = None
    else:
        g_mean, g_var = next(grads), next(grads)
        g_dmean = g_dvar = None
    g_offset = next(grads) if offset is not None else None
    g_residual = next(grads) if residual is not None else None
    return (g_dy, g_x, g_scale, g_offset, g_mean, g_var, None, g_residual, g_dmean, g_dvar)
