"""Synchronized BatchNorm under MirroredStrategy over N logical CPU devices, compared with
single-device BatchNorm on the concatenated global batch. Prints one JSON line of results.

Usage: python distributed_probe.py N. test_distributed.py runs it in a fresh process:
logical devices must be configured before TensorFlow initializes its devices.
"""

import json
import os
import sys
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

N = int(sys.argv[1])
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(N)]
)

import keras  # noqa: E402

import tfbn  # noqa: E402

keras.utils.set_random_seed(0)
STRATEGY = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
assert STRATEGY.num_replicas_in_sync == N
BATCH = 12
SPLITS = {
    2: {"even": [6, 6], "uneven": [9, 3], "empty": [0, 12]},
    4: {"even": [3, 3, 3, 3], "uneven": [6, 1, 3, 2], "empty": [5, 0, 4, 3]},
}[N]
LAYOUTS = {"NHWC": ((BATCH, 4, 4, 3), -1), "NCHW": ((BATCH, 3, 4, 4), 1), "NC": ((BATCH, 5), -1)}
DTYPES = {"float64": tf.float64, "float32": tf.float32}


def distribute(arrays, split):
    """Per-replica slices of each array (replica i gets rows split[:i].sum() onward)."""
    starts = np.concatenate([[0], np.cumsum(split)])

    def fn(ctx):
        i = ctx.replica_id_in_sync_group
        return tuple(tf.constant(a[starts[i]:starts[i + 1]]) for a in arrays)

    return STRATEGY.experimental_distribute_values_from_function(fn)


def local(v):
    return [t.numpy() for t in STRATEGY.experimental_local_results(v)]


def err(got, ref):
    """Max |got - ref| relative to max(1, max |ref|)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max())) if ref.size else 0.0


def functional_case(layout, dtype, split, stats_grad):
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(1)
    np_dtype = dtype.as_numpy_dtype
    x = rng.normal(3.0, 2.0, shape).astype(np_dtype)
    dy = rng.normal(size=shape).astype(np_dtype)
    c = shape[axis]
    scale = tf.constant(rng.uniform(0.5, 1.5, c), dtype)
    offset = tf.constant(rng.uniform(-1, 1, c), dtype)
    a = tf.constant(rng.normal(size=c), dtype)
    b = tf.constant(rng.normal(size=c), dtype)
    w = 1.0 / N if stats_grad else 0.0  # each replica's loss uses the global statistics

    def loss_fn(y, mean, var, dy_):
        return tf.reduce_sum(y * dy_) + w * (tf.reduce_sum(mean * a) + tf.reduce_sum(var * b))

    def step(xs, dys):
        with tf.GradientTape() as tape:
            tape.watch([xs, scale, offset])
            y, mean, var = tfbn.batch_norm(xs, scale, offset, axis=axis, synchronized=True)
            loss = loss_fn(y, mean, var, dys)
        return (y, mean, var) + tuple(tape.gradient(loss, [xs, scale, offset]))

    out = tf.function(lambda v: STRATEGY.run(step, args=v))(distribute([x, dy], split))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch([xt, scale, offset])
        y, mean, var = tfbn.batch_norm(xt, scale, offset, axis=axis)
        loss = tf.reduce_sum(y * dy) + w * N * (tf.reduce_sum(mean * a) + tf.reduce_sum(var * b))
    dx, dscale, doffset = tape.gradient(loss, [xt, scale, offset])
    return {
        "y": err(np.concatenate(local(out[0])), y),
        "mean": max(err(m, mean) for m in local(out[1])),
        "variance": max(err(v, var) for v in local(out[2])),
        "dx": err(np.concatenate(local(out[3])), dx),
        "dscale": err(sum(local(out[4])), dscale),
        "doffset": err(sum(local(out[5])), doffset),
    }


def make_layer(cls, axis, dtype, shape, **kwargs):
    layer = cls(axis=axis, momentum=0.9, dtype=dtype, **kwargs)
    layer.build(shape)
    rng = np.random.default_rng(5)
    layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in layer.weights])
    return layer


def layer_case(layout, dtype, split):
    """dtype float64, float32, or float16 (the mixed_float16 policy: float32 weights)."""
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(2)
    x = rng.normal(-2.0, 3.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    if dtype == "float16":
        dtype = "mixed_float16"
    with STRATEGY.scope():
        layer = make_layer(tfbn.BatchNormalization, axis, dtype, shape, synchronized=True)

    def step(xs, dys):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            loss = tf.reduce_sum(layer(xs, training=True) * dys)
        return tape.gradient(loss, [xs, layer.gamma.value, layer.beta.value])

    fn = tf.function(lambda v: STRATEGY.run(step, args=v))
    out = fn(distribute([x, dy], split))
    ref = make_layer(tfbn.BatchNormalization, axis, dtype, shape)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(ref(xt, training=True) * dy)
    grads = tape.gradient(loss, [xt, ref.gamma.value, ref.beta.value])
    moving = [local(layer.moving_mean.value), local(layer.moving_variance.value)]
    return {
        "dx": err(np.concatenate(local(out[0])), grads[0]),
        "dgamma": err(sum(local(out[1])), grads[1]),
        "dbeta": err(sum(local(out[2])), grads[2]),
        "moving_mean": max(err(m, ref.moving_mean.numpy()) for m in moving[0]),
        "moving_variance": max(err(v, ref.moving_variance.numpy()) for v in moving[1]),
        # the moving statistics are the same bits on every replica
        "replicas_identical": float(all(
            m.tobytes() == ms[0].tobytes() for ms in moving for m in ms)),
    }


COLLECTIVE_TYPES = ("CollectiveReduceV2", "CollectiveGatherV2", "CollectiveBcastSendV2",
                    "CollectiveBcastRecvV2", "CollectiveReduce", "CollectiveGather",
                    "NcclAllReduce", "CollectiveAllToAllV2")


def count_collectives(fn, *args):
    graph = fn.get_concrete_function(*args).graph
    types = Counter(op.type for op in graph.get_operations())
    return sum(types[t] for t in COLLECTIVE_TYPES)


def collective_counts(cls):
    """Collective ops per replica in the traced forward graph and in the backward part."""
    shape = (8, 4, 4, 3)
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    with STRATEGY.scope():
        layer = make_layer(cls, -1, "float32", shape, synchronized=True)

    def forward(xs):
        return layer(xs, training=True)

    def forward_backward(xs):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = layer(xs, training=True)
        return tape.gradient(y, [xs] + [w.value for w in layer.trainable_weights])

    vals = distribute([x], [8 // N] * N)
    fwd = count_collectives(tf.function(lambda v: STRATEGY.run(forward, args=v)), vals)
    both = count_collectives(tf.function(lambda v: STRATEGY.run(forward_backward, args=v)), vals)
    return {"forward": fwd / N, "backward": (both - fwd) / N}


def accuracy():
    """float32 data with mean 1e4 and std 1: max |y - float64 math on the same values|."""
    shape = (32, 4, 4, 8)
    x = np.random.default_rng(4).normal(1e4, 1.0, shape).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + np.float32(1e-3))
    result = {}
    for name, cls in (("tfbn_synchronized", tfbn.BatchNormalization),
                      ("keras_synchronized", keras.layers.BatchNormalization)):
        with STRATEGY.scope():
            layer = cls(synchronized=True)
            layer.build(shape)
        fn = tf.function(lambda v, layer=layer: STRATEGY.run(
            lambda xs: layer(xs, training=True), args=v))
        y = np.concatenate(local(fn(distribute([x], [32 // N] * N))))
        result[name] = float(np.abs(y - ref).max())
    y, _, _ = tfbn.batch_norm(x)
    result["tfbn_single_device"] = float(np.abs(y.numpy() - ref).max())
    return result


def small_model(synchronized):
    keras.utils.set_random_seed(11)
    return keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(4, 3, padding="same"),
        tfbn.BatchNormalization(synchronized=synchronized, momentum=0.8),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])


def fit():
    """model.fit under MirroredStrategy vs one device on the same global batches."""
    rng = np.random.default_rng(6)
    x = rng.normal(1.0, 2.0, (32, 6, 6, 3)).astype(np.float32)
    y = rng.normal(size=(32, 2)).astype(np.float32)
    weights = []
    for distributed in (True, False):
        scope = STRATEGY.scope() if distributed else tf.distribute.get_strategy().scope()
        with scope:
            model = small_model(synchronized=True)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    return {"weights": max(err(a, b) for a, b in zip(*weights))}


def main():
    results = {"functional": {}, "layer": {}}
    for layout in LAYOUTS:
        for dname, dtype in DTYPES.items():
            for sname, split in SPLITS.items():
                key = f"{layout}/{dname}/{sname}"
                results["functional"][key] = functional_case(layout, dtype, split, False)
                results["layer"][key] = layer_case(layout, dname, split)
            if layout == "NHWC":
                results["layer"][f"{layout}/float16/uneven"] = layer_case(
                    layout, "float16", SPLITS["uneven"])
                results["functional"][f"{layout}/{dname}/uneven/stats_grad"] = functional_case(
                    layout, dtype, SPLITS["uneven"], True)
    results["counts"] = {"tfbn": collective_counts(tfbn.BatchNormalization),
                         "keras": collective_counts(keras.layers.BatchNormalization)}
    results["accuracy"] = accuracy()
    results["fit"] = fit()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
