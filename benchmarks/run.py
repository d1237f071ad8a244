"""tfbn benchmarks: `python benchmarks/run.py [--quick]` (what `make bench` runs).

Runs the op benchmark (op_bench.py), the per-call overhead (overhead.py), the end-to-end
training run (e2e_digits.py), the renorm/mask training step (renorm_mask.py) and the fused
epilogue (epilogue.py) in one process, prints the tables and writes
benchmarks/results/{op_bench,overhead,e2e_digits,renorm_mask,epilogue}[-quick].json,
speedup[-quick].png and floors[-quick].png (each contender against the DRAM and cache floors);
then the distributed benchmark (distributed.py) in a process of its own (it needs logical
devices set up before TensorFlow starts).
Part "pairs" (side_by_side.py: tfbn's NHWC and NCHW in float32, bfloat16 and float16 timed
in the same rounds, for the half-precision and layout ratios) writes side_by_side[-quick].json.
Part "onednn" (onednn.py, tfbn with TF_ENABLE_ONEDNN_OPTS=0 and =1, each setting in child
processes) writes onednn[-quick].json.
Part "resnet" (e2e_resnet.py, ResNet-50 with Keras BN vs tfbn.convert) writes
e2e_resnet[-quick].json.
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("op", "pairs", "overhead", "onednn", "e2e", "resnet", "renorm_mask", "epilogue",
         "distributed")


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a few shapes, float32 only, few repetitions (under a minute)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                   help="run only these parts")
    p.add_argument("--reps", type=int,
                   help="timed rounds per case (op benchmark: default 5, quick 3, each a block "
                        "of back-to-back calls; the other parts: default 20, quick 5)")
    p.add_argument("--budget", type=float, default=15.0,
                   help="seconds per case after which rounds stop (at least 3 or 5 are done)")
    p.add_argument("--dtypes", nargs="+", help="op benchmark dtypes (default all; quick float32)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    return p.parse_args()


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _meta(args):
    import keras
    import tensorflow as tf

    import tfbn

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick, "commit": commit, "tfbn": tfbn.__version__,
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "python": platform.python_version(), "cpu": _cpu_model(), "cores": os.cpu_count(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
    }


def main():
    args = _args()
    start = time.perf_counter()
    import tensorflow as tf

    # Every case traces fresh tf.functions on purpose; TensorFlow's retracing warning is noise.
    tf.get_logger().setLevel("ERROR")
    import op_bench
    import report

    meta = _meta(args)
    suffix = "-quick" if args.quick else ""
    out = lambda name: os.path.join(args.out, name + suffix)  # noqa: E731
    print(f"tfbn benchmarks ({'quick' if args.quick else 'full'}): TensorFlow "
          f"{meta['tensorflow']}, Keras {meta['keras']}, {meta['cpu']}, {meta['cores']} cores",
          flush=True)

    if "op" in args.only:
        dtypes = args.dtypes or (["float32"] if args.quick else list(op_bench.DTYPES))
        reps = args.reps or (3 if args.quick else op_bench.ROUNDS)
        print(f"op benchmark: {reps} rounds of {op_bench.BLOCK} back-to-back timed calls per "
              f"contender and case (fewer rounds after {args.budget:.0f} s, at least "
              f"{min(3, reps)})", flush=True)
        records = op_bench.run(quick=args.quick, reps=reps, min_reps=min(3, reps),
                               budget_s=args.budget, dtypes=dtypes)
        print(report.op_table(records))
        print(report.memory_table(records))
        report.write_json(out("op_bench") + ".json", meta, {"records": records})
        report.speedup_chart(records, out("speedup") + ".png")
        report.floors_chart(records, out("floors") + ".png")
    if "pairs" in args.only:
        import side_by_side

        print("\ntfbn side by side: dtypes and layouts in the same rounds ...", flush=True)
        res = side_by_side.run(quick=args.quick)
        print(side_by_side.table(res))
        report.write_json(out("side_by_side") + ".json", meta, res)
    if "overhead" in args.only:
        import overhead

        res = overhead.run(quick=args.quick)
        print(report.overhead_table(res))
        report.write_json(out("overhead") + ".json", meta, res)
    if "onednn" in args.only:
        import onednn

        print("\ntfbn with oneDNN off and on (child processes) ...", flush=True)
        res = onednn.run(quick=args.quick, dtypes=args.dtypes)
        print(onednn.table(res))
        report.write_json(out("onednn") + ".json", meta, res)
    if "e2e" in args.only:
        import e2e_digits

        print("\nend-to-end training ...", flush=True)
        res = e2e_digits.run(quick=args.quick)
        print(report.e2e_table(res))
        report.write_json(out("e2e_digits") + ".json", meta, res)
    if "resnet" in args.only:
        import e2e_resnet

        print("\nend-to-end ResNet-50 (Keras BN vs tfbn.convert) ...", flush=True)
        res = e2e_resnet.run(quick=args.quick, reps=args.reps)
        print(e2e_resnet.table(res))
        report.write_json(out("e2e_resnet") + ".json", meta, res)
    if "renorm_mask" in args.only:
        import renorm_mask

        print("\nrenorm and masks (training step) ...", flush=True)
        res = renorm_mask.run(quick=args.quick, reps=args.reps)
        print(renorm_mask.table(res))
        report.write_json(out("renorm_mask") + ".json", meta, res)
    if "epilogue" in args.only:
        import epilogue

        print("\nfused epilogue relu(BN(x) + shortcut) ...", flush=True)
        res = epilogue.run(quick=args.quick, reps=args.reps, budget_s=args.budget)
        print(epilogue.table(res))
        report.write_json(out("epilogue") + ".json", meta, res)
    if "distributed" in args.only:
        print("\ndistributed training (MirroredStrategy, 2 logical CPU devices) ...", flush=True)
        command = [sys.executable, os.path.join(HERE, "distributed.py"),
                   "--out", out("distributed") + ".json"] + (["--quick"] if args.quick else [])
        subprocess.run(command, check=True)
    if not args.quick and os.path.abspath(args.out) == os.path.join(HERE, "results"):
        import tables  # the documents' figures from the results just written

        print("\n" + tables.write_documents())
    print(f"\nresults in {args.out}; total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
