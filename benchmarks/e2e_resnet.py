"""End to end: ResNet-50 (keras.applications, weights=None), 112x112, batch 16, float32.

Keras' BatchNormalization against `tfbn.convert(model)` without and with the fused epilogue
(BN + add + relu, the tail of every ResNet block, in one op). All models hold the same
weights. Training: one `train_on_batch` step (SGD) on a fixed batch; inference: one
`predict_on_batch`. The steps of all models are interleaved, round after round, so that a
busy machine slows all alike; reported are medians, images/s and ratios to Keras.

The full run also times inference of the fused model with `inference_op='tfbn'` (tfbn's
op instead of TensorFlow's standard ops, which grappler folds into the convolutions).
`--quick` leaves that out and runs few rounds: it checks that the case works, its
figures are rough.
"""

import time

import keras
import numpy as np
import tensorflow as tf

import tfbn
from timing import median_ms, round_robin

SEED = 0
INPUT = (112, 112, 3)
BATCH = 16
CLASSES = 1000


def _models(with_tfbn_op):
    keras.utils.set_random_seed(SEED)
    base = keras.applications.ResNet50(weights=None, input_shape=INPUT, classes=CLASSES,
                                       classifier_activation=None)
    # Statistics and affine parameters away from 1/0/0/1, so that the agreement check
    # compares something.
    rng = np.random.default_rng(SEED)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c),
                               rng.uniform(-0.5, 0.5, c), rng.uniform(0.5, 1.5, c)])
    models = {"keras": base, "tfbn": tfbn.convert(base, fuse_epilogue=False),
              "tfbn_fused": tfbn.convert(base)}
    for model in models.values():
        model.compile(optimizer=keras.optimizers.SGD(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=False)
    if not with_tfbn_op:
        return models, {}
    tfbn_op = tfbn.convert(base)
    for layer in tfbn_op.layers:
        if isinstance(layer, tfbn.BatchNormalization):
            layer.inference_op = "tfbn"
    return models, {"tfbn_fused (tfbn op)": tfbn_op}


def _count(model):
    bns = [lyr for lyr in model.layers if isinstance(lyr, keras.layers.BatchNormalization)]
    return {"batch_norm_layers": len(bns),
            "fused": sum(getattr(lyr, "activation", None) is not None for lyr in bns)}


CONV_SHAPE = (16, 28, 28, 256)  # a ResNet-50 stage-3 activation at 112x112 input, NHWC


def bn_after_conv(reps=100, budget_s=40.0):
    """One 1x1 Conv2D followed by inference BatchNormalization (+ relu, or + add + relu),
    as a tf.function: TensorFlow's standard ops (what the layer builds by default), Keras'
    composite (x * a + b) and tfbn's op, against the convolution with only the relu (and
    add). Median ms of interleaved calls. Where grappler folds the normalization into the
    convolution, the standard ops cost what the convolution alone costs."""
    rng = np.random.default_rng(SEED)
    c = CONV_SHAPE[-1]
    x = tf.constant(rng.standard_normal(CONV_SHAPE).astype(np.float32))
    shortcut = tf.constant(rng.standard_normal(CONV_SHAPE).astype(np.float32))
    kernel = tf.Variable(0.05 * rng.standard_normal((1, 1, c, c)).astype(np.float32))
    scale, offset, mean, var = (tf.Variable(rng.uniform(0.5, 1.5, c).astype(np.float32))
                                for _ in range(4))
    conv = lambda x: tf.nn.conv2d(x, kernel, 1, "SAME")  # noqa: E731

    def standard(x, r):
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(conv(x), scale, offset, mean, var,
                                                   epsilon=1e-3, is_training=False)
        return tf.nn.relu(y if r is None else y + r)

    def composite(x, r):
        a = tf.math.rsqrt(var + 1e-3) * scale
        y = conv(x) * a + (offset - mean * a)
        return tf.nn.relu(y if r is None else y + r)

    def tfbn_op(x, r):
        return tfbn.batch_norm(conv(x), scale, offset, mean, var, training=False,
                               residual=r, activation="relu")[0]

    def conv_only(x, r):
        return tf.nn.relu(conv(x) if r is None else conv(x) + r)

    calls = {}
    for tail, r in (("relu", None), ("add+relu", shortcut)):
        for name, f in (("conv only", conv_only), ("standard ops", standard),
                        ("keras composite", composite), ("tfbn op", tfbn_op)):
            fn = tf.function(lambda x, f=f, r=r: f(x, r))
            calls[f"{tail}: {name}"] = lambda fn=fn: fn(x).numpy()
    samples, _ = round_robin(calls, reps, min_reps=10, budget_s=budget_s, warmup=2)
    return {"shape": list(CONV_SHAPE), "median_ms": {n: median_ms(v) for n, v in samples.items()},
            "reps": len(next(iter(samples.values())))}


def run(quick=False, reps=None, budget_s=None):
    reps = reps or (3 if quick else 15)
    budget_s = budget_s or (8.0 if quick else 150.0)
    t0 = time.perf_counter()
    models, extra = _models(with_tfbn_op=not quick)
    rng = np.random.default_rng(SEED)
    x = tf.constant(rng.standard_normal((BATCH,) + INPUT).astype(np.float32))
    y = tf.constant(rng.integers(0, CLASSES, BATCH).astype(np.int32))
    infer_models = dict(models, **extra)
    # Agreement in inference (same weights): before any training step moves them apart.
    ref = models["keras"].predict_on_batch(x)
    scale = np.abs(ref).max()
    agreement = {name: float(np.abs(m.predict_on_batch(x) - ref).max() / scale)
                 for name, m in infer_models.items() if name != "keras"}
    infer, _ = round_robin({n: (lambda m=m: m.predict_on_batch(x))
                            for n, m in infer_models.items()},
                           reps, min_reps=min(3, reps), budget_s=budget_s, warmup=1)
    train, _ = round_robin({n: (lambda m=m: m.train_on_batch(x, y)) for n, m in models.items()},
                           reps, min_reps=min(2, reps), budget_s=budget_s, warmup=1)
    result = {"model": "keras.applications.ResNet50(weights=None)", "input": list(INPUT),
              "batch_size": BATCH, "dtype": "float32", "layers": {n: _count(m) for n, m in
                                                                  infer_models.items()},
              "max_rel_diff_inference_vs_keras": agreement}
    for mode, samples in (("train", train), ("inference", infer)):
        ms = {n: median_ms(v) for n, v in samples.items()}
        result[mode] = {n: {"median_ms": ms[n], "images_per_s": 1e3 * BATCH / ms[n],
                            "rounds": len(samples[n])} for n in ms}
        result[mode + "_speedup_vs_keras"] = {n: ms["keras"] / ms[n] for n in ms if n != "keras"}
    if not quick:
        result["bn_after_conv"] = bn_after_conv()
    result["seconds"] = time.perf_counter() - t0
    return result


def table(res):
    lines = ["", f"End to end: {res['model']}, {tuple(res['input'])}, batch "
                 f"{res['batch_size']}, {res['dtype']} (median of interleaved rounds)"]
    for mode in ("train", "inference"):
        for name, r in res[mode].items():
            ratio = res[mode + "_speedup_vs_keras"].get(name)
            lines.append(f"  {mode:9s} {name:22s} {r['median_ms']:8.1f} ms  "
                         f"{r['images_per_s']:7.1f} images/s"
                         + (f"  {ratio:5.2f}x keras" if ratio else "")
                         + f"  ({r['rounds']} rounds)")
    fused = res["layers"]["tfbn_fused"]
    lines.append(f"  tfbn_fused: {fused['fused']} of {fused['batch_norm_layers']} "
                 "BatchNormalization layers carry the epilogue; inference vs keras, max "
                 "relative difference: " + ", ".join(
                     f"{n} {d:.1e}" for n, d in res["max_rel_diff_inference_vs_keras"].items()))
    if "bn_after_conv" in res:
        b = res["bn_after_conv"]
        lines.append(f"  inference BN after a 1x1 Conv2D, {tuple(b['shape'])}, median ms of "
                     f"{b['reps']}: " + ", ".join(f"{n} {ms:.1f}" for n, ms in
                                                b["median_ms"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int)
    args = p.parse_args()
    res = run(quick=args.quick, reps=args.reps)
    print(table(res))
    print(json.dumps(res, indent=1))
