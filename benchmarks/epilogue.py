"""Fused epilogue benchmark: a ResNet block's tail, relu(BatchNorm(x) + shortcut), training
forward + backward (gradients of x, scale, offset and the shortcut) and inference forward.

Two training modes: train_fwd_bwd takes x, shortcut and dy as function inputs (held by the
caller, so no op may write into them); train_live first makes them inside the function
(x * k, ...), as the convolutions and the next layer's gradient do in a network, so ops
may reuse their buffers. Its times include those three multiplies, timed alone as
"producers".

Contenders, every one a tf.function on the same inputs, timed interleaved in this process:
  fused      tfbn.batch_norm(x, scale, offset, residual=shortcut, activation="relu")
  tfbn+tf    tfbn.batch_norm(x, scale, offset), then tf.add and tf.nn.relu
  fbv3+tf    tf.raw_ops.FusedBatchNormV3 (oneDNN), then tf.add and tf.nn.relu
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


def make_inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    vec = lambda lo, hi: tf.constant(rng.uniform(lo, hi, c).astype(np.float32))  # noqa: E731
    full = lambda: tf.constant(rng.standard_normal(shape, np.float32))  # noqa: E731
    return (full(), vec(0.5, 1.5), vec(-0.5, 0.5), full(), vec(-0.1, 0.1), vec(0.8, 1.2),
            full())


def run(quick=False, reps=None, budget_s=15.0, log=sys.stderr):
    reps = reps or (5 if quick else 20)
    with_memory = memory_stats_available()
    records = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        inputs = make_inputs(shape)
        nbytes = int(np.prod(shape)) * 4
        for mode in MODES:
            t0 = time.perf_counter()
            fns, concretes, first = {}, {}, {}
            for name in CONTENDERS:
                fns[name], concretes[name] = build(name, mode, inputs)
                out = fns[name]()
                first[name] = out if mode == "infer" else out[0]
            if mode == "train_live":
                fns["producers"] = build("producers", mode, inputs)[0]
            # The same answer (float32 math): dx, or y in inference.
            agree = {n: float(tf.reduce_max(tf.abs(first[n] - first["tfbn+tf"])))
                     for n in CONTENDERS}
            del first, out
            samples, _ = round_robin(fns, reps, min(5, reps), budget_s)
            res = {}
            for name in CONTENDERS:
                res[name] = {"ms": median_ms(samples[name]),
                             "max_abs_diff_vs_tfbn+tf": agree[name]}
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
            cell = f"{name} {r['ms']:7.2f}"
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
