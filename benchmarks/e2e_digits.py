"""End to end: a small ResNet-style CNN trained on scikit-learn's 8x8 digits (no download),
once with keras.layers.BatchNormalization and once with tfbn.BatchNormalization.

Both models start from the same weights (the tfbn model takes the Keras model's) and see
the batches in the same order; their epochs are interleaved so that a noisy machine slows
both alike. Reported: training images/s (median over the epochs after the first, which
traces) and the final validation accuracy of each.
"""

import statistics
import time

import keras
import numpy as np
from sklearn.datasets import load_digits

import tfbn

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


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=False,  # the same (no XLA) for both; Keras' "auto" is off on CPU anyway
    )


def run(quick=False):
    epochs = 4 if quick else 12
    (x_train, y_train), (x_val, y_val) = _data()
    keras.utils.set_random_seed(SEED)
    models = {"keras": _model(lambda: keras.layers.BatchNormalization(momentum=MOMENTUM))}
    models["tfbn"] = _model(lambda: tfbn.BatchNormalization(momentum=MOMENTUM))
    models["tfbn"].set_weights(models["keras"].get_weights())
    for model in models.values():
        _compile(model)
    seconds = {name: [] for name in models}
    for epoch in range(epochs):
        for name, model in models.items():
            keras.utils.set_random_seed(SEED + epoch)  # the same shuffling for both
            t0 = time.perf_counter()
            model.fit(x_train, y_train, batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
            seconds[name].append(time.perf_counter() - t0)
    result = {"epochs": epochs, "batch_size": BATCH, "train_images": len(x_train),
              "val_images": len(x_val), "models": {}}
    for name, model in models.items():
        _, accuracy = model.evaluate(x_val, y_val, batch_size=256, verbose=0)
        result["models"][name] = {
            "images_per_s": len(x_train) / statistics.median(seconds[name][1:]),
            "first_epoch_s": seconds[name][0],
            "val_accuracy": float(accuracy),
        }
    m = result["models"]
    result["speedup"] = m["tfbn"]["images_per_s"] / m["keras"]["images_per_s"]
    result["accuracy_gap_points"] = 100 * (m["tfbn"]["val_accuracy"] - m["keras"]["val_accuracy"])
    return result
