"""Large outputs from tfbn's output cache (oneDNN off: TensorFlow's plain CPU allocator),
checked while they are recycled: prints one JSON line with a digest of the first round's
outputs and the rounds whose outputs differed from it.

Each round runs the fused op (forward, backward), the epilogue and the split ops, on
outputs of 1 MiB and more, and keeps the previous round's outputs alive while the round
before that is dropped: its blocks go back to the cache and become this round's outputs
while the others are still held. Any block handed out twice, or written after it was
given back, shows as a round that differs from the first.

Used by test_output_cache.py in fresh processes (TF_ENABLE_ONEDNN_OPTS is read at import).
"""

import hashlib
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfbn  # noqa: E402
from tfbn import split  # noqa: E402

CASES = [((16, 28, 28, 64), -1), ((16, 64, 28, 28), 1), ((8192, 64), -1)]
ROUNDS = 5


def one_round(inputs):
    outputs = []
    for x, dy, residual, scale, offset, axis in inputs:
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, scale, offset, residual])
            plain = tfbn.batch_norm(x, scale, offset, axis=axis)
            fused = tfbn.batch_norm(x, scale, offset, axis=axis, residual=residual,
                                    activation="relu")
            sharded = split.split_batch_norm(x, scale, offset, axis=axis, epsilon=1e-3)
        for y in (plain[0], fused[0], sharded[0]):
            outputs.append(y)
            outputs.extend(tape.gradient(y, [x, scale, offset, residual], output_gradients=dy))
    return [t for t in outputs if t is not None]


def main():
    rng = np.random.default_rng(0)
    inputs = []
    for shape, axis in CASES:
        for dtype in (tf.float32, tf.bfloat16):
            x, dy, residual = (
                tf.cast(tf.constant(rng.normal(loc, size=shape).astype(np.float32)), dtype)
                for loc in (2.0, 0.0, 0.0))
            c = shape[axis]
            scale = tf.constant(rng.uniform(0.5, 1.5, c), tf.float32)
            offset = tf.constant(rng.normal(size=c), tf.float32)
            inputs.append((x, dy, residual, scale, offset, axis))
    first = [t.numpy().tobytes() for t in one_round(inputs)]
    differed, previous = [], None
    for r in range(ROUNDS):
        current = one_round(inputs)  # the round before the previous is freed by now
        for held in [current] + ([previous] if previous else []):
            if [t.numpy().tobytes() for t in held] != first:
                differed.append(r)
        previous = current
    digest = hashlib.sha256(b"".join(first)).hexdigest()
    print(json.dumps({"digest": digest, "differed": sorted(set(differed)),
                      "outputs": len(first)}))


main()
