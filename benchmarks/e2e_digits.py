"""End to end: a small ResNet-style CNN trained on scikit-learn's 8x8 digits (no download),
with keras.layers.BatchNormalization and with tfbn.BatchNormalization, each without and
with XLA (model.compile(jit_compile=True); tfbn's ops compile through their lowerings).

All models start from the same weights (the tfbn models take the Keras model's) and see
the batches in the same order; their epochs are interleaved so that a noisy machine slows
all alike. Reported: training images/s and steps/s (median over the epochs after the
first, which traces and compiles), the final validation accuracy of each, and the ratios:
each taken per epoch, from epochs run seconds apart, then their median over the epochs (a
ratio of the medians mixed epochs from different minutes: 0.89x in one run, 1.07x and
1.12x in the next two, for tfbn_xla / keras_xla).
Then one BatchNorm's training forward + backward under XLA, tfbn's lowering against
TensorFlow's FusedBatchNormV3 (which XLA lowers itself), timed in the same run.
"""

import statistics
import time

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import tfbn
from timing import median_ms, round_robin

SEED = 0
BATCH = 64
# (filters, stride) of the residual blocks after the stem.
BLOCKS = [(32, 1), (32, 1), (64, 2), (64, 1)]
# Keras' default 0.99 leaves the moving statistics far behind the weights after the few
# hundred steps this run takes, and inference accuracy collapses; 0.9 keeps up.
MOMENTUM = 0.9


def _data():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # [n, 8, 8, 1] in [0, 1]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(SEED).permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _model(bn):
    layers = keras.layers
    conv = lambda f, k, s=1: layers.Conv2D(f, k, strides=s, padding="same", use_bias=False)  # noqa: E731
    inputs = keras.Input((8, 8, 1))
    x = layers.ReLU()(bn()(conv(32, 3)(inputs)))
    for filters, stride in BLOCKS:
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = bn()(conv(filters, 1, stride)(x))
        y = layers.ReLU()(bn()(conv(filters, 3, stride)(x)))
        y = bn()(conv(filters, 3)(y))
        x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10)(x))


def _compile(model, jit_compile):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,  # explicit: Keras' "auto" is off on CPU-only machines
    )
    # Keras quietly falls back to no XLA where a layer does not support it: say so.
    if model.jit_compile != jit_compile:
        raise RuntimeError(f"model.compile(jit_compile={jit_compile}) was refused "
                           f"(tfbn.build_info(): {tfbn.build_info()})")


XLA_OP_SHAPE = (32, 28, 28, 64)  # NHWC, float32


def op_under_xla(reps=20, budget_s=15.0):
    """Training forward + backward of one BatchNorm compiled with XLA: tfbn's lowering vs
    FusedBatchNormV3 (median ms of `reps` interleaved calls)."""
    rng = np.random.default_rng(SEED)
    x = tf.constant(rng.normal(size=XLA_OP_SHAPE).astype(np.float32))
    dy = tf.constant(rng.normal(size=XLA_OP_SHAPE).astype(np.float32))
    c = XLA_OP_SHAPE[-1]
    scale, offset = tf.ones([c]), tf.zeros([c])

    def step(bn):
        @tf.function(jit_compile=True)
        def run(x, dy, scale, offset):
            with tf.GradientTape() as tape:
                tape.watch([x, scale, offset])
                y = bn(x, scale, offset)
            return tape.gradient(y, [x, scale, offset], output_gradients=dy)
        return lambda: [t.numpy() for t in run(x, dy, scale, offset)]

    def fused(x, scale, offset):
        return tf.compat.v1.nn.fused_batch_norm(x, scale, offset, epsilon=1e-3,
                                                is_training=True)[0]

    calls = {"tfbn": step(lambda x, s, o: tfbn.batch_norm(x, s, o)[0]),
             "FusedBatchNormV3": step(fused)}
    samples, _ = round_robin(calls, reps, min_reps=5, budget_s=budget_s)
    ms = {name: median_ms(v) for name, v in samples.items()}
    return {"shape": list(XLA_OP_SHAPE), "dtype": "float32", "mode": "training fwd+bwd",
            "median_ms": ms, "reps": len(samples["tfbn"]),
            "speedup_vs_fused_v3": ms["FusedBatchNormV3"] / ms["tfbn"]}


MODELS = {  # name: (BatchNormalization class, jit_compile)
    "keras": (keras.layers.BatchNormalization, False),
    "tfbn": (tfbn.BatchNormalization, False),
    "keras_xla": (keras.layers.BatchNormalization, True),
    "tfbn_xla": (tfbn.BatchNormalization, True),
}


def run(quick=False):
    epochs = 4 if quick else 12
    (x_train, y_train), (x_val, y_val) = _data()
    keras.utils.set_random_seed(SEED)
    models = {}
    for name, (bn, jit_compile) in MODELS.items():
        models[name] = _model(lambda bn=bn: bn(momentum=MOMENTUM))
        if name != "keras":
            models[name].set_weights(models["keras"].get_weights())
        _compile(models[name], jit_compile)
    seconds = {name: [] for name in models}
    for epoch in range(epochs):
        for name, model in models.items():
            keras.utils.set_random_seed(SEED + epoch)  # the same shuffling for all
            t0 = time.perf_counter()
            model.fit(x_train, y_train, batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
            seconds[name].append(time.perf_counter() - t0)
    steps = -(-len(x_train) // BATCH)
    result = {"epochs": epochs, "batch_size": BATCH, "train_images": len(x_train),
              "val_images": len(x_val), "steps_per_epoch": steps, "models": {}}
    for name, model in models.items():
        _, accuracy = model.evaluate(x_val, y_val, batch_size=256, verbose=0)
        epoch_s = statistics.median(seconds[name][1:])
        result["models"][name] = {
            "images_per_s": len(x_train) / epoch_s,
            "steps_per_s": steps / epoch_s,
            "first_epoch_s": seconds[name][0],
            "val_accuracy": float(accuracy),
            "jit_compile": MODELS[name][1],
        }
    m = result["models"]

    def ratio(a, b):  # steps/s of a over b: per epoch (seconds apart), median over epochs
        return statistics.median(tb / ta for ta, tb in zip(seconds[a][1:], seconds[b][1:]))

    result["speedup"] = ratio("tfbn", "keras")
    result["accuracy_gap_points"] = 100 * (m["tfbn"]["val_accuracy"] - m["keras"]["val_accuracy"])
    result["xla"] = {
        "tfbn_xla / keras_xla": ratio("tfbn_xla", "keras_xla"),
        "keras_xla / keras": ratio("keras_xla", "keras"),
        "tfbn_xla / tfbn": ratio("tfbn_xla", "tfbn"),
        "tfbn_xla / keras": ratio("tfbn_xla", "keras"),
        "accuracy_gap_points": 100 * (m["tfbn_xla"]["val_accuracy"]
                                      - m["keras_xla"]["val_accuracy"]),
    }
    result["op_under_xla"] = op_under_xla(reps=5 if quick else 20, budget_s=5 if quick else 15)
    return result
