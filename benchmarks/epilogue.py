"""Fused epilogue benchmark: a ResNet block's tail, relu(BatchNorm(x) + shortcut), training
forward + backward (gradients of x, scale, offset and the shortcut) and inference forward.

Two training modes: train_fwd_bwd takes x, shortcut and dy as function inputs (held by the
caller, so no op may write into them); train_live first makes them inside the function
(x * k, ...), as the convolutions and the next layer's gradient do in a network, so ops
may reuse their buffers. Its times include those three multiplies, timed alone as
"producers".

Contenders, every one a tf.function on the same inputs, timed in this process in rounds
that take each in turn warm (one untimed call, then BLOCK timed calls back to back):
  fused      tfbn.batch_norm(x, scale, offset, residual=shortcut, activation="relu")
  tfbn+tf    tfbn.batch_norm(x, scale, offset), then tf.add and tf.nn.relu
  fbv3+tf    tf.raw_ops.FusedBatchNormV3 (oneDNN), then tf.add and tf.nn.relu
Correctness: every contender's outputs (y in inference; dx, dscale, doffset and dshortcut
in training) are compared with the same math in float64; a contender off by more than
float32 rounding is flagged "!" in the table and "agrees": false in the JSON. dy is zero
where the pre-activation z lies within KINK_MARGIN of relu's kink: there float32 rounding
of z decides relu's derivative, and an element landing on the other side than in float64
changes dx, dscale, doffset and dshortcut by its dy (runs before this rule recorded such
differences of up to 2.1 for FusedBatchNormV3 + add + relu, whose z is the least accurate).
Memory: the peak bytes TensorFlow's CPU allocator reports for one call (above what was held
before it; the returned gradients count), and, from each training graph, the full-size
intermediate tensors the forward pass hands to the backward pass (the inputs x and shortcut
not counted).

`python benchmarks/epilogue.py [--quick]` or `python benchmarks/run.py --only epilogue`.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from timing import median_ms, memory_stats_available, peak_bytes, round_robin

SHAPES = [(32, 56, 56, 256), (32, 28, 28, 512), (32, 14, 14, 1024), (32, 7, 7, 2048)]
QUICK_SHAPES = [(32, 28, 28, 512)]
CONTENDERS = ("fused", "tfbn+tf", "fbv3+tf")
MODES = ("train_fwd_bwd", "train_live", "infer")


def _forward(name, x, scale, offset, shortcut, training, mean, variance):
    import tfbn

    if name == "fused":
        stats = {} if training else {"mean": mean, "variance": variance}
        return tfbn.batch_norm(x, scale, offset, training=training, residual=shortcut,
                               activation="relu", **stats)[0]
    if name == "tfbn+tf":
        stats = {} if training else {"mean": mean, "variance": variance}
        y = tfbn.batch_norm(x, scale, offset, training=training, **stats)[0]
    else:
        empty = tf.zeros([0])
        y = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=empty if training else mean,
            variance=empty if training else variance, epsilon=1e-3, is_training=training,
        )[0]
    return tf.nn.relu(tf.add(y, shortcut))


def build(name, mode, inputs):
    """A tf.function of the contender, and the concrete function it runs."""
    x, scale, offset, shortcut, mean, variance, dy = inputs
    if mode == "train_live":
        k = tf.constant(1.0)

        def live(x0, r0):
            x, r, g = x0 * k, r0 * k, dy * k  # live intermediates, as in a network
            if name == "producers":
                return x, r, g
            with tf.GradientTape() as tape:
                tape.watch([x, scale, offset, r])
                y = _forward(name, x, scale, offset, r, True, None, None)
            return tape.gradient(y, [x, scale, offset, r], output_gradients=g)

        fn = tf.function(live)
    elif mode == "infer":
        fn = tf.function(lambda x, r: _forward(name, x, scale, offset, r, False, mean,
                                               variance))
    else:
        def train(x, r):
            with tf.GradientTape() as tape:
                tape.watch([x, scale, offset, r])
                y = _forward(name, x, scale, offset, r, True, None, None)
            return tape.gradient(y, [x, scale, offset, r], output_gradients=dy)

        fn = tf.function(train)
    concrete = fn.get_concrete_function(x, shortcut)
    return (lambda: concrete(x, shortcut)), concrete


# Largest error against float64, relative to the largest value of each output, that
# float32 math gives here (measured: below 1e-5); a wrong result is off by far more.
AGREE_REL_TOL = 1e-3


def float64_reference(mode, inputs):
    """The contenders' outputs in float64: y (inference) or dx, dscale, doffset,
    dshortcut (training), from relu(BN(x) + shortcut) written as TensorFlow ops."""
    x, scale, offset, shortcut, mean, variance, dy = (tf.cast(t, tf.float64) for t in inputs)
    eps = tf.constant(float(np.float32(1e-3)), tf.float64)
    if mode == "infer":
        bn = (x - mean) * tf.math.rsqrt(variance + eps) * scale + offset
        return [tf.nn.relu(bn + shortcut)]
    with tf.GradientTape() as tape:
        tape.watch([x, scale, offset, shortcut])
        m, v = tf.nn.moments(x, [0, 1, 2])
        bn = (x - m) * tf.math.rsqrt(v + eps) * scale + offset
        y = tf.nn.relu(bn + shortcut)
    return tape.gradient(y, [x, scale, offset, shortcut], output_gradients=dy)


def max_rel_error(got, want):
    """Largest |got - want| over each output, relative to that output's largest value."""
    got = got if isinstance(got, (list, tuple)) else [got]
    return max(float(tf.reduce_max(tf.abs(tf.cast(g, tf.float64) - w))
                     / max(float(tf.reduce_max(tf.abs(w))), 1e-30))
               for g, w in zip(got, want))


def saved_full_size(concrete, shape):
    """Full-size tensors made by the forward pass and read by the backward pass (the
    function's own inputs excluded): what the training step keeps alive between them."""
    graph = concrete.graph
    inputs = {t.ref() for t in graph.inputs}
    count = 0
    for op in graph.get_operations():
        if op.name.startswith("gradient_tape/"):
            continue
        for t in op.outputs:
            if t.ref() in inputs or t.shape.rank is None or t.shape.as_list() != list(shape):
                continue
            if any(c.name.startswith("gradient_tape/") for c in t.consumers()):
                count += 1
    return count


# Where |z| (float64) is below this, dy is zero: float32 rounding of z may put the element
# on either side of relu's kink (z errors of float32 BatchNorms reach about 1e-5 here).
KINK_MARGIN = 1e-4


def make_inputs(shape, seed=0):
    """x, scale, offset, shortcut, mean, variance, dy (float32 NHWC); dy is zero where the
    training forward's z lies within KINK_MARGIN of relu's kink."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    vec = lambda lo, hi: rng.uniform(lo, hi, c).astype(np.float32)  # noqa: E731
    full = lambda: rng.standard_normal(shape, np.float32)  # noqa: E731
    x, scale, offset, shortcut = full(), vec(0.5, 1.5), vec(-0.5, 0.5), full()
    mean, variance, dy = vec(-0.1, 0.1), vec(0.8, 1.2), full()
    x64 = tf.constant(x, tf.float64)
    m, v = tf.nn.moments(x64, [0, 1, 2])
    z = ((x64 - m) * tf.math.rsqrt(v + float(np.float32(1e-3))) * scale.astype(np.float64)
         + offset.astype(np.float64) + shortcut.astype(np.float64))
    dy = tf.where(tf.abs(z) < KINK_MARGIN, 0.0, dy)
    del x64, z
    return tuple(tf.constant(t) for t in (x, scale, offset, shortcut, mean, variance)) + (dy,)


# Timing as in the op benchmark (timing.round_robin): ROUNDS rounds, each making per
# contender one untimed call and BLOCK timed ones back to back; the median over the rounds
# of the per-round medians.
ROUNDS = 5
BLOCK = 4


def run(quick=False, reps=None, budget_s=15.0, log=sys.stderr):
    reps = reps or (3 if quick else ROUNDS)
    with_memory = memory_stats_available()
    records = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        inputs = make_inputs(shape)
        nbytes = int(np.prod(shape)) * 4
        for mode in MODES:
            t0 = time.perf_counter()
            want = float64_reference(mode, inputs)
            fns, concretes, error = {}, {}, {}
            for name in CONTENDERS:
                fns[name], concretes[name] = build(name, mode, inputs)
                error[name] = max_rel_error(fns[name](), want)
            if mode == "train_live":
                fns["producers"] = build("producers", mode, inputs)[0]
            del want
            samples, _ = round_robin(fns, reps, min(3, reps), budget_s, block=BLOCK)
            res = {}
            for name in CONTENDERS:
                res[name] = {"ms": median_ms(samples[name]),
                             "max_rel_error_vs_float64": error[name],
                             "agrees": error[name] <= AGREE_REL_TOL}
                if with_memory:
                    res[name]["peak_mb"] = peak_bytes(fns[name]) / 2**20
                    res[name]["peak_x"] = res[name]["peak_mb"] * 2**20 / nbytes
                if mode == "train_fwd_bwd":
                    res[name]["saved_full_size"] = saved_full_size(concretes[name], shape)
            for name in CONTENDERS[1:]:
                res[name]["ratio_vs_fused"] = res[name]["ms"] / res["fused"]["ms"]
            if "producers" in samples:
                prod = median_ms(samples["producers"])
                res["producers"] = {"ms": prod}
                for name in CONTENDERS[1:]:  # the ratio of the block tails alone
                    res[name]["net_ratio_vs_fused"] = (
                        (res[name]["ms"] - prod) / (res["fused"]["ms"] - prod))
            records.append({"shape": list(shape), "layout": "NHWC", "dtype": "float32",
                            "mode": mode, "nbytes": nbytes, "reps": len(samples["fused"]),
                            "block": BLOCK,
                            "results": res})
            summary = "  ".join(f"{n}={res[n]['ms']:.2f}" for n in CONTENDERS)
            print(f"  {str(shape):20s} {mode:14s} {summary}  ({time.perf_counter() - t0:.0f}s)",
                  file=log, flush=True)
        del inputs
    return {"records": records, "memory": "TensorFlow CPU allocator peak" if with_memory
            else "not reported by TensorFlow here"}


def table(res):
    lines = ["", "Fused epilogue relu(BN(x) + shortcut), float32 NHWC: median ms (ratio to "
                 "fused; > 1: fused is faster), peak MB (x bytes), full-size tensors saved "
                 "for the backward"]
    for rec in res["records"]:
        cells = []
        for name in CONTENDERS:
            r = rec["results"][name]
            cell = f"{name} {r['ms']:7.2f}{'!' if r.get('agrees') is False else ''}"
            if "ratio_vs_fused" in r:
                cell += f" ({r['ratio_vs_fused']:.2f}x"
                if "net_ratio_vs_fused" in r:
                    cell += f", {r['net_ratio_vs_fused']:.2f}x w/o producers"
                cell += ")"
            if "peak_mb" in r:
                cell += f" {r['peak_mb']:.0f}MB ({r['peak_x']:.1f}x)"
            if "saved_full_size" in r:
                cell += f" saved {r['saved_full_size']}"
            cells.append(cell)
        if "producers" in rec["results"]:
            cells.append(f"producers {rec['results']['producers']['ms']:.2f}")
        lines.append(f"  {str(tuple(rec['shape'])):20s} {rec['mode']:14s} n={rec['reps']:2d}  "
                     + " | ".join(cells))
    wrong = {}
    for rec in res["records"]:
        for name in CONTENDERS:
            r = rec["results"][name]
            if r.get("agrees") is False:
                wrong.setdefault(name, []).append(
                    f"{tuple(rec['shape'])} {rec['mode']}: {r['max_rel_error_vs_float64']:.1e}")
    if wrong:
        lines += ["", "! wrong result: largest error against float64, relative to the "
                      "output's largest value"]
        for name, where in wrong.items():
            lines.append(f"  {name}: " + "; ".join(where))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one shape, 5 repetitions")
    p.add_argument("--reps", type=int)
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args()
    tf.get_logger().setLevel("ERROR")
    res = run(quick=args.quick, reps=args.reps)
    print(table(res))
    if args.out:
        import report

        report.write_json(args.out, {"quick": args.quick}, res)


if __name__ == "__main__":
    main()
