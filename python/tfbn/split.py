"""The split BatchNorm path: statistics | (collective) | apply, forward and backward.

One function runs every BatchNorm that the fused op does not cover on its own:

- synchronized BatchNorm (a tf.distribute replica context: one all-gather of the
  per-replica partial statistics forward, one all-reduce of the gradient sums backward);
- masks: one weight per position (Keras' mask, broadcast over the channels), so the
  statistics are the weighted mean and the weighted biased variance, and every element is
  normalized with them;
- batch renormalization: a per-channel correction (r, d) of the statistics the op
  computes, y = xhat * (scale * r) + (scale * d + offset), with r and d held constant
  in the gradient (as Keras' stop_gradient).

With one device there is no collective: the ops run back to back on the batch.
"""

import tensorflow as tf

from ._library import ops as _ops


def _no_second_order(op, *grads):
    raise NotImplementedError(
        f"tfbn: second-order gradients (a gradient of a gradient) through synchronized "
        f"BatchNorm are not supported: {op.type} has no gradient. On one device the layer "
        f"and tfbn.batch_norm provide them with synchronized=False."
    )


# The split path's backward ops. On one device split_batch_norm differentiates its backward
# in TensorFlow ops instead; only the synchronized path reaches these, and a clear error
# beats TensorFlow's "no gradient registered" LookupError.
tf.RegisterGradient("TfbnBatchNormGradSums")(_no_second_order)
tf.RegisterGradient("TfbnBatchNormGradApply")(_no_second_order)


def _nonzero(grad):
    """None for a gradient that is absent or, in a graph, statically zero (what
    tf.custom_gradient passes for outputs that were not used), so the all-reduce then packs
    2 rows, not 4. Eagerly every value is "static": deciding on it could pack different
    shapes on different replicas, so there only None counts as absent."""
    if grad is None or tf.executing_eagerly():
        return grad
    value = tf.get_static_value(grad)
    if value is not None and not value.any():
        return None
    return grad


def _gather(ctx, partial):
    """Every replica's [3, C] partials as [replicas, 3, C], in replica order, with ONE
    collective: each replica puts its partials in its own slot of zeros and the slots
    are summed. Adding zeros is exact, so this is an exact all-gather (ctx.all_gather
    issues two collectives, the first to agree on shapes)."""
    replicas = ctx.num_replicas_in_sync
    mine = tf.equal(tf.range(replicas), tf.cast(ctx.replica_id_in_sync_group, tf.int32))
    slots = tf.where(mine[:, None, None], partial[None], tf.zeros_like(partial)[None])
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, slots)


def renorm_correction(renorm_mean, renorm_stddev, *, epsilon, clipping):
    """Keras' batch renormalization correction as a function of the batch statistics.

    renorm_mean / renorm_stddev are tensors (read from the layer's variables beforehand).
    Returns correction(mean, variance) -> (r, d): r = stddev / renorm_stddev,
    d = (mean - renorm_mean) / renorm_stddev with stddev = sqrt(variance + epsilon) and
    renorm_stddev at least sqrt(epsilon); r clipped to [rmin, rmax], d to [-dmax, dmax]
    (missing keys: no bound).
    """
    clipping = clipping or {}

    def correction(mean, variance):
        stddev = tf.sqrt(variance + tf.constant(epsilon, variance.dtype))
        denom = tf.maximum(tf.cast(renorm_stddev, mean.dtype),
                           tf.sqrt(tf.constant(epsilon, mean.dtype)))
        r = stddev / denom
        d = (mean - tf.cast(renorm_mean, mean.dtype)) / denom
        if clipping.get("rmin") is not None:
            r = tf.maximum(r, tf.constant(clipping["rmin"], r.dtype))
        if clipping.get("rmax") is not None:
            r = tf.minimum(r, tf.constant(clipping["rmax"], r.dtype))
        if clipping.get("dmax") is not None:
            dmax = tf.constant(clipping["dmax"], d.dtype)
            d = tf.clip_by_value(d, -dmax, dmax)
        return r, d

    return correction


def split_batch_norm(x, scale, offset, *, axis, epsilon, ctx=None, weights=None,
                     correction=None):
    """Training-mode BatchNorm of x through the split ops.

    x, scale, offset, axis, epsilon: as `tfbn.batch_norm(..., training=True)` (validated
    there). ctx: a replica context to synchronize over, or None (this batch alone).
    weights: None (every element weighs 1) or a float32 tensor of x's shape without the
    channel axis, finite and >= 0, one weight per position shared by all channels.
    correction: None or correction(mean, variance) -> (r, d), per-channel tensors of the
    statistics' dtype, computed from the batch statistics and held constant in the
    gradient (batch renormalization); it must read tensors, not variables.

    Returns (y, mean, variance): the (global, weighted) batch mean and biased variance.
    Where the weights sum to 0 those are NaN, and x is normalized as Keras normalizes
    a fully masked batch: with mean 0 and variance 0.
    """
    dtype = tf.float64 if x.dtype == tf.float64 else tf.float32
    empty = tf.zeros([0], dtype)
    no_weights = tf.zeros([0], tf.float32)
    has_scale, has_offset = scale is not None, offset is not None
    inputs = [x] + ([scale] if has_scale else []) + ([offset] if has_offset else [])
    w = no_weights if weights is None else tf.cast(weights, tf.float32)

    @tf.custom_gradient
    def forward(*inputs):
        x = inputs[0]
        rest = iter(inputs[1:])
        s = next(rest) if has_scale else None
        o = next(rest) if has_offset else None
        partial = _ops.tfbn_batch_norm_stats(x, w, axis=axis)
        partials = partial if ctx is None else _gather(ctx, partial)
        mean, variance, mean_lo, count = _ops.tfbn_batch_norm_merge_stats(partials, U=dtype)
        n_mean, n_var, n_lo = mean, variance, mean_lo
        if weights is not None:  # no weight at all: Keras' mean 0, variance 0
            some = count > 0
            n_mean, n_var, n_lo = (tf.where(some, v, tf.zeros_like(v))
                                   for v in (mean, variance, mean_lo))
        s_eff, o_eff = s, o
        if correction is not None:
            r, d = correction(n_mean, n_var)
            r, d = tf.stop_gradient(r), tf.stop_gradient(d)
            s_eff = r if s is None else s * r
            o_eff = d if s is None else s * d
            o_eff = o_eff if o is None else o_eff + o
        y = _ops.tfbn_batch_norm_apply(
            x, empty if s_eff is None else s_eff, empty if o_eff is None else o_eff,
            n_mean, n_var, n_lo, epsilon=epsilon, axis=axis,
        )

        def kernel_grad(dy, d_mean, d_variance):
            local = _ops.tfbn_batch_norm_grad_sums(dy, x, n_mean, n_lo, axis=axis)
            d_mean, d_variance = _nonzero(d_mean), _nonzero(d_variance)
            packed = [local]
            if d_mean is not None or d_variance is not None:
                # The statistics are functions of every replica's x: their gradients are
                # summed with the rest and folded into dx (as the fused op does locally).
                packed.append(tf.stack([
                    tf.zeros_like(mean, tf.float64) if d_mean is None
                    else tf.cast(d_mean, tf.float64),
                    tf.zeros_like(mean, tf.float64) if d_variance is None
                    else tf.cast(d_variance, tf.float64),
                ]))
            packed = tf.concat(packed, axis=0) if len(packed) > 1 else local
            total = packed if ctx is None else ctx.all_reduce(tf.distribute.ReduceOp.SUM, packed)
            dx, dscale, doffset = _ops.tfbn_batch_norm_grad_apply(
                dy, x, empty if s_eff is None else s_eff, n_mean, n_var, n_lo, local, total,
                count, w, epsilon=epsilon, axis=axis,
            )
            if correction is not None and has_scale:
                # y = xhat * (s * r) + (s * d + o): dscale = r * sum(dy * xhat) + d * sum(dy)
                dscale = r * dscale + d * doffset
            return [dx] + ([dscale] if has_scale else []) + ([doffset] if has_offset else [])

        def grad(dy, d_mean, d_variance):
            dy = tf.zeros_like(x) if dy is None else dy
            if ctx is not None:
                return kernel_grad(dy, d_mean, d_variance)
            # The kernels give the first order; higher orders (a gradient penalty)
            # differentiate the same backward written in TensorFlow ops.
            dm = tf.zeros_like(mean) if d_mean is None else d_mean
            dv = tf.zeros_like(variance) if d_variance is None else d_variance

            @tf.custom_gradient
            def backward(dy, dm, dv, *inputs):
                first = kernel_grad(dy, None if d_mean is None else dm,
                                    None if d_variance is None else dv)

                def grad2(*upstream):
                    sources = [dy, dm, dv, *inputs]
                    with tf.GradientTape() as tape:
                        tape.watch(sources)
                        again = _composite_grad(inputs, dy, dm, dv)
                    upstream = [tf.zeros_like(a) if u is None else u
                                for u, a in zip(upstream, again)]
                    return tape.gradient(again, sources, output_gradients=upstream,
                                         unconnected_gradients=tf.UnconnectedGradients.ZERO)

                return first, grad2

            return backward(dy, dm, dv, *inputs)

        return (y, mean, variance), grad

    def _composite_grad(inputs, dy, dm, dv):
        """The first-order gradient of `forward` w.r.t. its inputs, from the same math in
        differentiable TensorFlow ops (weighted statistics, r and d held constant)."""
        inputs = list(inputs)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outs = _composite_forward(*inputs)
        return tape.gradient(outs, inputs, output_gradients=[dy, dm, dv],
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _composite_forward(x, *rest):
        rest = iter(rest)
        s = next(rest) if has_scale else None
        o = next(rest) if has_offset else None
        ax = axis % x.shape.rank
        shape = tf.shape(x, out_type=tf.int64)
        outer, inner = tf.reduce_prod(shape[:ax]), tf.reduce_prod(shape[ax + 1:])
        x3 = tf.reshape(tf.cast(x, dtype), tf.stack([outer, shape[ax], inner]))
        col = lambda v: v[None, :, None]  # noqa: E731
        if weights is None:
            w3, total = None, tf.cast(outer * inner, dtype)
        else:
            w3 = tf.reshape(tf.cast(w, dtype), tf.stack([outer, 1, inner]))
            total = tf.reduce_sum(w3)
        safe = tf.where(total > 0, total, tf.ones_like(total))  # no weight: mean 0, var 0

        def weighted_sum(v):  # masked values (NaN included) never reach the sums
            return tf.reduce_sum(v if w3 is None else tf.where(w3 > 0, w3 * v, 0.0), [0, 2])

        m = weighted_sum(x3) / safe
        xc = x3 - col(m)
        v = weighted_sum(xc * xc) / safe
        xhat = xc * col(tf.math.rsqrt(v + tf.cast(tf.constant(epsilon, tf.float32), dtype)))
        s_eff, o_eff = s, o
        if correction is not None:
            r, d = (tf.stop_gradient(t) for t in correction(m, v))
            s_eff = r if s is None else s * r
            o_eff = d if s is None else s * d
            o_eff = o_eff if o is None else o_eff + o
        y3 = xhat if s_eff is None else xhat * col(s_eff)
        y3 = y3 if o_eff is None else y3 + col(o_eff)
        return tf.cast(tf.reshape(y3, tf.shape(x)), x.dtype), m, v

    return forward(*inputs)
