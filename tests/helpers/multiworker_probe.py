"""A small Keras model with synchronized tfbn BatchNorm, trained for a few steps in a
custom training loop (strategy.run), either as one worker of a MultiWorkerMirroredStrategy
cluster (TF_CONFIG in the environment) or alone on the global batch.

Usage: python multiworker_probe.py (worker|single) OUT.npz
Writes the final weights (model.get_weights(): kernels, gamma, beta, moving statistics).
Started by test_distributed.py; each worker holds one replica and its slice of each
global batch (uneven: worker 0 gets 5 of 8 rows, worker 1 gets 3).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

MODE, OUT = sys.argv[1], sys.argv[2]
GLOBAL_BATCH, STEPS = 8, 4
SPLIT = [5, 3]

if MODE == "worker":
    STRATEGY = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING,
            timeout_seconds=120,
        )
    )
else:
    STRATEGY = tf.distribute.get_strategy()

import keras  # noqa: E402

import tfbn  # noqa: E402


def build_model():
    keras.utils.set_random_seed(21)
    return keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
        tfbn.BatchNormalization(synchronized=True, momentum=0.8),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])


rng = np.random.default_rng(3)
X = rng.normal(5.0, 2.0, (STEPS, GLOBAL_BATCH, 6, 6, 3)).astype(np.float32)
Y = rng.normal(size=(STEPS, GLOBAL_BATCH, 2)).astype(np.float32)

with STRATEGY.scope():
    model = build_model()
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)


def replica_step(x, y):
    with tf.GradientTape() as tape:
        pred = model(x, training=True)
        # Sum over this replica's rows / global batch: the replicas' losses add up to the
        # mean over the global batch, and the optimizer sums the replicas' gradients.
        loss = tf.reduce_sum(tf.square(pred - y)) / GLOBAL_BATCH
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


@tf.function
def train_step(x, y):
    return STRATEGY.run(replica_step, args=(x, y))


for step in range(STEPS):
    if MODE == "worker":
        starts = np.concatenate([[0], np.cumsum(SPLIT)])

        def slices(ctx, step=step, starts=starts):
            i = ctx.replica_id_in_sync_group
            return (tf.constant(X[step, starts[i]:starts[i + 1]]),
                    tf.constant(Y[step, starts[i]:starts[i + 1]]))

        x, y = STRATEGY.experimental_distribute_values_from_function(slices)
    else:
        x, y = tf.constant(X[step]), tf.constant(Y[step])
    train_step(x, y)

np.savez(OUT, *model.get_weights())
print("done", MODE)
