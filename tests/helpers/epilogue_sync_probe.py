"""Synchronized BatchNorm with an epilogue over 2 logical CPU devices (MirroredStrategy):
prints the largest difference from relu(BN over the global batch + residual) and its
gradients (run by test_epilogue.py in a fresh process: devices are set before TF starts)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import tfbn  # noqa: E402

rng = np.random.default_rng(0)
x = rng.normal(2.0, 3.0, (8, 3, 5)).astype(np.float64)
r = rng.normal(size=x.shape)
dy = rng.normal(size=x.shape)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def parts(a):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(a[4 * ctx.replica_id_in_sync_group:][:4]))


@tf.function
def step(xs, rs, dys):
    def fn(x, r, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, r])
            y = tfbn.batch_norm(x, residual=r, activation="relu", synchronized=True)[0]
        return (y,) + tuple(tape.gradient(y, [x, r], output_gradients=dy))

    return strategy.run(fn, args=(xs, rs, dys))


got = [np.concatenate([t.numpy() for t in strategy.experimental_local_results(v)])
       for v in step(parts(x), parts(r), parts(dy))]
xt, rt = tf.constant(x), tf.constant(r)
with tf.GradientTape() as tape:
    tape.watch([xt, rt])
    y = tfbn.batch_norm(xt, residual=rt, activation="relu")[0]
want = [y.numpy()] + [g.numpy() for g in tape.gradient(y, [xt, rt], output_gradients=dy)]
print(max(float(np.abs(a - b).max()) for a, b in zip(got, want)))
