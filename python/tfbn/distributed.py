"""Synchronized BatchNorm: statistics of the global batch across tf.distribute replicas.

Each replica computes per-channel partials (count, mean, M2) of its slice; ONE collective
(an exact all-gather, see split._gather) brings every replica's partials to every replica,
and the op merges them in replica order (Chan's pairwise update), so all replicas get the
same bits and the result keeps the precision of the data however the batch is divided.
The backward pass all-reduces ONE packed tensor of per-channel sums (sum dy,
sum dy * (x - mean), and the gradients reaching the returned statistics where there are
any). A replica with an empty slice contributes count 0.

Used through `tfbn.batch_norm(..., synchronized=True)` and
`tfbn.BatchNormalization(synchronized=True)`: in a replica context they run
`tfbn.split.split_batch_norm` with `ctx=replica_context()`; outside a strategy (or with
one replica) they run the single-device fused op. The split ops also serve masks and
batch renormalization on one device.
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


def partial_moments(x, weights=None, *, axis=-1):
    """[3, C] float64: count, mean and M2 (sum of squared deviations) per channel of x;
    with weights (x's shape without the channel axis): weight sum, weighted mean and
    M2 = sum w * (x - mean)^2."""
    w = tf.zeros([0], tf.float32) if weights is None else tf.cast(weights, tf.float32)
    return _ops.tfbn_batch_norm_stats(x, w, axis=axis)


def merge_moments(partials, dtype=tf.float32):
    """Merges [parts, 3, C] or [3 * parts, C] partials in part order.

    Returns (mean, variance, mean_lo, count): mean and the biased variance in
    `dtype` (NaN where count is 0), mean_lo = mean - dtype(mean) for the apply step,
    count (float64) the elements per channel.
    """
    return _ops.tfbn_batch_norm_merge_stats(partials, U=dtype)

