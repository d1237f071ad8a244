"""Synchronized BatchNorm: statistics of the global batch across tf.distribute replicas.

Each replica computes per-channel partials (count, mean, M2) of its slice; ONE collective
(an exact all-gather, see _gather) brings every replica's partials to every replica, and
the op merges them in replica order
(Chan's pairwise update), so all replicas get the same bits and the result keeps the
precision of the data whatever the split. The backward pass all-reduces ONE packed tensor
of per-channel sums (sum dy, sum dy * (x - mean), and the gradients reaching the returned
statistics where there are any). A replica with an empty slice contributes count 0.

Used through `tfbn.batch_norm(..., synchronized=True)` and
`tfbn.BatchNormalization(synchronized=True)`; outside a strategy (or with one replica)
those run the single-device fused op.
"""

import tensorflow as tf

from ._library import ops as _ops


def replica_context():
    """The replica context to synchronize over, or None where there is nothing to
    synchronize: no strategy, one replica, or cross-replica context (outside
    `strategy.run`, where each call sees the whole batch anyway)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def partial_moments(x, *, axis=-1):
    """[3, C] float64: count, mean and M2 (sum of squared deviations) per channel of x."""
    return _ops.tfbn_batch_norm_stats(x, axis=axis)


def merge_moments(partials, dtype=tf.float32):
    """Merges [parts, 3, C] or [3 * parts, C] partials in part order.

    Returns (mean, variance, mean_residual, count): mean and the biased variance in
    `dtype` (NaN where count is 0), mean_residual = mean - dtype(mean) for the apply step,
    count (float64) the elements per channel.
    """
    return _ops.tfbn_batch_norm_merge_stats(partials, U=dtype)


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


def sync_batch_norm(x, scale, offset, *, axis, epsilon, ctx):
    """Training-mode BatchNorm of x with the statistics of all replicas in `ctx`.

    Same arguments and results as `tfbn.batch_norm(..., training=True)` (validated
    there): returns (y, global batch mean, global biased batch variance).
    """
    dtype = tf.float64 if x.dtype == tf.float64 else tf.float32
    empty = tf.zeros([0], dtype)
    has_scale, has_offset = scale is not None, offset is not None
    inputs = [x] + ([scale] if has_scale else []) + ([offset] if has_offset else [])

    @tf.custom_gradient
    def forward(*inputs):
        x = inputs[0]
        rest = iter(inputs[1:])
        s = next(rest) if has_scale else empty
        o = next(rest) if has_offset else empty
        partials = _gather(ctx, _ops.tfbn_batch_norm_stats(x, axis=axis))
        mean, variance, residual, count = _ops.tfbn_batch_norm_merge_stats(partials, U=dtype)
        y = _ops.tfbn_batch_norm_apply(
            x, s, o, mean, variance, residual, epsilon=epsilon, axis=axis
        )

        def grad(dy, d_mean, d_variance):
            dy = tf.zeros_like(x) if dy is None else dy
            local = _ops.tfbn_batch_norm_grad_sums(dy, x, mean, residual, axis=axis)
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
            total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, packed)
            dx, dscale, doffset = _ops.tfbn_batch_norm_grad_apply(
                dy, x, s, mean, variance, residual, local, total, count,
                epsilon=epsilon, axis=axis,
            )
            return [dx] + ([dscale] if has_scale else []) + ([doffset] if has_offset else [])

        return (y, mean, variance), grad

    return forward(*inputs)
