"""Renorm and mask benchmark: one training step (forward, backward to the input and the
weights, moving-statistics update) of tfbn.BatchNormalization vs Keras' own layer with
`renorm=True` and with a mask, float32 NHWC, inside tf.function.

The plain layers (no renorm, no mask) run in the same rounds as anchors, so the cost of
each option shows next to the step it extends. `python benchmarks/renorm_mask.py
[--quick]` runs it alone; benchmarks/run.py runs it as part "renorm_mask".
"""

import argparse
import os
import sys

import keras
import numpy as np
import tensorflow as tf

import tfbn
from timing import median_ms, round_robin

SHAPES = [(32, 112, 112, 64), (32, 56, 56, 256), (32, 28, 28, 512)]
QUICK_SHAPES = [(32, 28, 28, 512), (32, 14, 14, 1024)]
# Configurations: layer arguments and whether a mask is passed (8 in 10 positions kept).
CONFIGS = {
    "renorm": ({"renorm": True, "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}},
               False),
    "mask": ({}, True),
    "plain": ({}, False),
}
LAYERS = {"tfbn": tfbn.BatchNormalization, "keras": keras.layers.BatchNormalization}


def _step(cls, kwargs, x, mask, dy):
    layer = cls(momentum=0.9, **kwargs)
    layer.build(x.shape)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
        grads = tape.gradient(y, [x] + layer.trainable_weights, output_gradients=dy)
        return [y] + grads

    return step


def run_shape(shape, reps, min_reps, budget_s):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape, np.float32) * 2.0 + 0.5)
    dy = tf.constant(rng.standard_normal(shape, np.float32))
    mask = tf.constant(rng.random(shape[:-1]) < 0.8)
    fns, agreement = {}, {}
    for config, (kwargs, masked) in CONFIGS.items():
        outs = {}
        for name, cls in LAYERS.items():
            fn = _step(cls, kwargs, x, mask if masked else None, dy)
            outs[name] = fn()  # traces, and the first results for the agreement check
            fns[(config, name)] = fn
        ref = outs["keras"]
        agreement[config] = max(
            float(tf.reduce_max(tf.abs(a - b))) / max(1.0, float(tf.reduce_max(tf.abs(b))))
            for a, b in zip(outs["tfbn"], ref))  # y, dx, dgamma, dbeta
        del outs, ref
    samples, _ = round_robin(fns, reps, min_reps, budget_s)
    ms = {key: median_ms(v) for key, v in samples.items()}
    results = {}
    for config in CONFIGS:
        t, k = ms[(config, "tfbn")], ms[(config, "keras")]
        results[config] = {"tfbn_ms": t, "keras_ms": k, "speedup": k / t,
                           "max_rel_diff_vs_keras": agreement[config],
                           "reps": len(samples[(config, "tfbn")])}
    for config in ("renorm", "mask"):  # cost of the option over the plain step, same run
        results[config]["tfbn_vs_plain"] = results[config]["tfbn_ms"] / results["plain"]["tfbn_ms"]
        results[config]["keras_vs_plain"] = (results[config]["keras_ms"]
                                             / results["plain"]["keras_ms"])
    return {"shape": list(shape), "layout": "NHWC", "dtype": "float32", "results": results}


def run(quick=False, reps=None, budget_s=20.0, log=sys.stderr):
    reps = reps or (5 if quick else 20)
    records = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        rec = run_shape(shape, reps, min(5, reps), budget_s)
        records.append(rec)
        r = rec["results"]
        print("  " + str(tuple(shape)) + "  " + "  ".join(
            f"{c}: tfbn {r[c]['tfbn_ms']:.1f} ms, keras {r[c]['keras_ms']:.1f} ms" for c in r),
            file=log, flush=True)
    return {"records": records, "reps": reps,
            "statistic": "median ms of a tf.function training step, configurations "
                         "interleaved round-robin"}


def table(res):
    lines = ["", "renorm and masks: training step (forward + backward + moving statistics), "
             "float32 NHWC, median ms",
             "| shape | option | tfbn | Keras | speedup | tfbn / tfbn plain | "
             "Keras / Keras plain | max rel diff |",
             "|---|---|---|---|---|---|---|---|"]
    for rec in res["records"]:
        for config, r in rec["results"].items():
            extra = (f"{r['tfbn_vs_plain']:.2f}x | {r['keras_vs_plain']:.2f}x"
                     if "tfbn_vs_plain" in r else "- | -")
            lines.append(f"| {tuple(rec['shape'])} | {config} | {r['tfbn_ms']:.1f} ms | "
                         f"{r['keras_ms']:.1f} ms | {r['speedup']:.2f}x | {extra} | "
                         f"{r['max_rel_diff_vs_keras']:.1e} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results"))
    args = p.parse_args()
    tf.get_logger().setLevel("ERROR")
    import report

    res = run(quick=args.quick, reps=args.reps)
    print(table(res))
    path = os.path.join(args.out, "renorm_mask" + ("-quick" if args.quick else "") + ".json")
    report.write_json(path, {"quick": args.quick}, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
