"""Benchmark 'distributed': a training step of a small CNN under MirroredStrategy with 2
logical CPU devices, BatchNorm as tfbn synchronized / tfbn unsynchronized / Keras
synchronized. Reports steps/s and the collective ops per step (per replica, counted in the
traced step graph; 'BN' is the part the BatchNorm layers add over the unsynchronized model).

    python benchmarks/distributed.py [--quick] [--devices N] [--out PATH]

Prints a table and writes benchmarks/results/distributed.json. Runs alone: the logical
devices must be configured before TensorFlow initializes, so call it in its own process.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
COLLECTIVE_TYPES = ("CollectiveReduceV2", "CollectiveGatherV2", "CollectiveBcastSendV2",
                    "CollectiveBcastRecvV2", "CollectiveReduce", "CollectiveGather",
                    "NcclAllReduce", "CollectiveAllToAllV2")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    p.add_argument("--devices", type=int, default=2, help="logical CPU devices (replicas)")
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--out", default=os.path.join(HERE, "results", "distributed.json"))
    return p.parse_args()


ARGS = parse_args()
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(ARGS.devices)])

import keras  # noqa: E402

import tfbn  # noqa: E402

VARIANTS = {
    "tfbn synchronized": lambda **kw: tfbn.BatchNormalization(synchronized=True, **kw),
    "tfbn unsynchronized": lambda **kw: tfbn.BatchNormalization(synchronized=False, **kw),
    "keras synchronized": lambda **kw: keras.layers.BatchNormalization(synchronized=True, **kw),
}


def build_model(bn):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        bn(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False),
        bn(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(64, 3, strides=2, padding="same", use_bias=False),
        bn(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])


def make_step(strategy, bn):
    with strategy.scope():
        model = build_model(bn)
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum")

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) / ARGS.batch
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return tf.function(lambda x, y: strategy.run(replica_step, args=(x, y)))


def collectives(step, x, y, replicas):
    graph = step.get_concrete_function(x, y).graph
    types = Counter(op.type for op in graph.get_operations())
    return sum(types[t] for t in COLLECTIVE_TYPES) / replicas


def time_interleaved(strategy, steps_by_name, x, y, steps, repeats):
    """Median steps/s per variant. The variants take turns (one block of `steps` steps
    each per round, the starting variant rotating), so that a busy machine's slow moments
    spread over all of them instead of landing on one."""
    names = list(steps_by_name)
    for name in names:
        for _ in range(3):  # trace and warm up
            steps_by_name[name](x, y)
    rates = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = steps_by_name[name]
            start = time.perf_counter()
            for _ in range(steps):
                loss = step(x, y)
            for t in strategy.experimental_local_results(loss):  # wait for the last step
                t.numpy()
            rates[name].append(steps / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in rates.items()}


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")])
    replicas = strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(ARGS.batch, 32, 32, 3)).astype(np.float32),
            rng.integers(0, 10, ARGS.batch).astype(np.int32))
    dataset = tf.data.Dataset.from_tensors(data)
    x, y = next(iter(strategy.experimental_distribute_dataset(dataset)))
    steps, repeats = (10, 3) if ARGS.quick else (30, 5)
    step_fns = {name: make_step(strategy, bn) for name, bn in VARIANTS.items()}
    rates = time_interleaved(strategy, step_fns, x, y, steps, repeats)
    rows = [{"variant": name, "steps_per_s": rates[name],
             "collectives_per_step": collectives(step, x, y, replicas)}
            for name, step in step_fns.items()]
    base = next(r for r in rows if r["variant"] == "tfbn unsynchronized")
    for r in rows:
        r["bn_collectives_per_step"] = r["collectives_per_step"] - base["collectives_per_step"]
        r["bn_collectives_per_layer"] = r["bn_collectives_per_step"] / 3
    result = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "quick": ARGS.quick, "commit": commit(), "tfbn": tfbn.__version__},
        "benchmark": "distributed",
        "model": "3 x (Conv2D + BatchNorm + ReLU), GlobalAveragePooling2D, Dense(10); "
                 f"input 32x32x3, global batch {ARGS.batch}, SGD with momentum",
        "strategy": f"MirroredStrategy over {replicas} logical CPU devices",
        "steps": steps, "repeats": repeats,
        "statistic": "median steps/s over repeats, variants interleaved round-robin",
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "results": rows,
    }
    print(f"distributed: {result['strategy']}; {result['model']}")
    header = f"{'variant':<22}{'steps/s':>10}{'collectives/step':>18}{'BN collectives/layer':>22}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['variant']:<22}{r['steps_per_s']:>10.2f}{r['collectives_per_step']:>18.0f}"
              f"{r['bn_collectives_per_layer']:>22.1f}")
    os.makedirs(os.path.dirname(ARGS.out), exist_ok=True)
    with open(ARGS.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.relpath(ARGS.out)}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
