"""Synchronized renorm + mask under MirroredStrategy over 2 logical CPU devices, compared
with the unsynchronized layer on the concatenated global batch. Prints one JSON line of
max relative errors. test_renorm_mask.py runs it in a fresh process (logical devices must
be configured before TensorFlow initializes its devices).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(2)])

import tfbn  # noqa: E402

STRATEGY = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
SHAPE, SPLIT = (12, 5, 4), [9, 3]
KW = dict(renorm=True, momentum=0.8, renorm_momentum=0.7, dtype="float64",
          renorm_clipping={"rmax": 1.3, "dmax": 0.2})


def weights_of(layer):
    return [w.numpy() for w in layer.weights]


def err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


rng = np.random.default_rng(0)
x = rng.normal(2.0, 3.0, SHAPE)
dy = rng.normal(size=SHAPE)
mask = rng.random(SHAPE[:-1]) > 0.3
mask[9:] = False  # the second replica's slice has no unmasked position

ref_layer = tfbn.BatchNormalization(**KW)
ref_layer.build(SHAPE)
init = [rng.uniform(0.5, 1.5, w.shape) for w in ref_layer.weights]
ref_layer.set_weights(init)
xt = tf.constant(x)
with tf.GradientTape() as tape:
    tape.watch(xt)
    y_ref = ref_layer(xt, training=True, mask=tf.constant(mask))
ref_grads = tape.gradient(y_ref, [xt] + ref_layer.trainable_weights, output_gradients=dy)

starts = np.concatenate([[0], np.cumsum(SPLIT)])


def replicated(synchronized):
    with STRATEGY.scope():
        layer = tfbn.BatchNormalization(synchronized=synchronized, **KW)
        layer.build(SHAPE)
    layer.set_weights(init)
    return layer



def slices(ctx):
    i = ctx.replica_id_in_sync_group
    return tuple(tf.constant(a[starts[i]:starts[i + 1]]) for a in (x, dy, mask))


def run(layer):
    @tf.function
    def step(xs, dys, ms):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = layer(xs, training=True, mask=ms)
        return [y] + tape.gradient(y, [xs] + layer.trainable_weights, output_gradients=dys)

    out = STRATEGY.run(step, args=STRATEGY.experimental_distribute_values_from_function(slices))
    return [[t.numpy() for t in STRATEGY.experimental_local_results(v)] for v in out]


layer = replicated(True)
local = run(layer)
unsynchronized = run(replicated(False))
result = {
    "y": err(np.concatenate(local[0]), y_ref),
    "dx": err(np.concatenate(local[1]), ref_grads[0]),
    "dgamma": err(sum(local[2]), ref_grads[1]),
    "dbeta": err(sum(local[3]), ref_grads[2]),
    "weights": max(err(a, b) for a, b in zip(weights_of(layer), weights_of(ref_layer))),
    # the same step with each replica's own statistics: far from the global batch's
    "unsynchronized_y": err(np.concatenate(unsynchronized[0]), y_ref),
}
print(json.dumps(result))
