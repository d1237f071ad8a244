"""Tables for the terminal, JSON files and the speedup chart."""

import json
import os
import statistics

from contenders import ANCHORS, CONTENDERS

MODE_TITLES = {
    "train_fwd": "training forward",
    "train_bwd": "training forward + backward (dx, dscale, doffset)",
    "infer": "inference",
}


def _shape(rec):
    return "(" + ",".join(str(d) for d in rec["shape"]) + ")"


def _groups(records):
    groups = {}
    for rec in records:
        groups.setdefault((rec["dtype"], rec["mode"]), []).append(rec)
    return groups


def _pct(r, key):
    """% of a floor; pct_floor is the DRAM floor in results written before the cache one."""
    value = r.get(key, r.get("pct_floor") if key == "pct_dram_floor" else None)
    return f"{value:4.0f}%" if value is not None else f"{'n/a':>5s}"


def _cell(r, with_speedup):
    if "ms" not in r:
        return f"{'n/a':>8s} {'':5s}" + (f" {'':>5s}" if with_speedup else "")
    flag = "!" if r.get("agrees") is False else " "
    text = f"{r['ms']:8.2f}{flag}{_pct(r, 'pct_dram_floor')}"
    if with_speedup:
        text += f" {r['speedup']:5.2f}" if "speedup" in r else f" {'':5s}"
    return text


def _core_cell(rec):
    core = rec["results"].get("tfbn_core")
    if not core:
        return f"{'n/a':>8s} {'':5s}"
    return f"{core['ms']:8.2f} {rec['tf_over_core']:5.2f}" if "tf_over_core" in rec \
        else f"{core['ms']:8.2f} {'':5s}"


def _gbps(rec, key):
    value = rec.get(key, rec["floor_gbps"] if key == "dram_gbps" else None)
    return f"{value:5.1f}" if value is not None else f"{'n/a':>5s}"


def op_table(records):
    """The timing table: one block per (dtype, mode), one row per shape."""
    lines, notes = [], {}
    head = f"{'shape':20s} {'layout':6s} {'DRAM':>5s} {'cache':>5s} {'LLC':3s} |"
    for name in CONTENDERS:
        width = 14 + (6 if name != "tfbn" else 6)
        head += f" {name:>{width}s} |"
        if name == "tfbn":
            head += f" {'core  tf/core':>14s} |"
    for (dtype, mode), recs in _groups(records).items():
        reps = sorted({r["reps"] for r in recs})
        block = sorted({r.get("block", 1) for r in recs})
        lines += ["", f"{dtype} - {MODE_TITLES[mode]} - median ms over "
                      f"{'/'.join(map(str, reps))} rounds of {'/'.join(map(str, block))} "
                      "back-to-back runs, % of the DRAM floor (tfbn: and of the cache floor), "
                      "speedup of tfbn (tfbn_layer: vs keras)",
                  "  DRAM, cache: the yardsticks' GB/s; LLC: y where the least traffic fits the "
                  "last-level cache; core: tfbn_core ms (pybind11), tf/core: tfbn / tfbn_core",
                  head]
        for rec in recs:
            fits = {True: "y", False: "n"}.get(rec.get("fits_llc"), "?")
            row = (f"{_shape(rec):20s} {rec['layout']:6s} {_gbps(rec, 'dram_gbps')} "
                   f"{_gbps(rec, 'cache_gbps')} {fits:>3s} |")
            for name in CONTENDERS:
                r = rec["results"][name]
                if name == "tfbn":
                    row += f" {_cell(r, False)} {_pct(r, 'pct_cache_floor')} |"
                    row += f" {_core_cell(rec)} |"
                else:
                    row += f" {_cell(r, True)} |"
                if "na" in r:
                    notes.setdefault(f"{name}: {r['na']}", []).append(f"{_shape(rec)} {dtype}")
                if r.get("agrees") is False:
                    notes.setdefault(
                        f"{name}: differs from keras by {r['rel_diff_vs_keras']:.1e} (relative)",
                        [],
                    ).append(f"{_shape(rec)} {dtype} {mode}")
            lines.append(row)
    ratios = [rec["tf_over_core"] for rec in records if "tf_over_core" in rec]
    if ratios:
        fwd = [rec["tf_over_core"] for rec in records
               if "tf_over_core" in rec and rec["mode"] == "train_fwd"]
        lines += ["", "tfbn (TensorFlow op) / tfbn_core (pybind11, same kernels): "
                      f"{min(ratios):.2f}x to {max(ratios):.2f}x"
                  + (f"; training forward {min(fwd):.2f}x to {max(fwd):.2f}x" if fwd else "")]
    in_graph = [rec["in_graph_over_core"] for rec in records if "in_graph_over_core" in rec]
    if in_graph:
        lines.append("training forward inside a graph (several ops per tf.function call) / "
                     f"tfbn_core: {min(in_graph):.2f}x to {max(in_graph):.2f}x, "
                     f"median {statistics.median(in_graph):.2f}x")
    if notes:
        lines += ["", "n/a and disagreements (!):"]
        for note, where in notes.items():
            lines.append(f"  {note}  [{len(where)} cases, e.g. {where[0]}]")
    return "\n".join(lines)


def memory_table(records):
    """Peak memory per call as a multiple of bytes(x), and bytes(x) itself in MiB."""
    if not any("peak_mb" in r for rec in records for r in rec["results"].values()):
        return "(peak memory: TensorFlow's CPU allocator statistics are not available)"
    lines = []
    for dtype in dict.fromkeys(rec["dtype"] for rec in records):
        lines += ["", f"{dtype} - peak TF-allocator memory per call, in multiples of bytes(x)",
                  f"{'shape':20s} {'layout':6s} {'x MiB':>7s} {'mode':9s} |"
                  + "".join(f" {n:>10s}" for n in CONTENDERS)]
        for rec in (r for r in records if r["dtype"] == dtype):
            mib = rec["nbytes"] / 2**20
            row = f"{_shape(rec):20s} {rec['layout']:6s} {mib:7.1f} {rec['mode']:9s} |"
            for name in CONTENDERS:
                r = rec["results"][name]
                row += f" {r['peak_mb'] / mib:10.2f}" if "peak_mb" in r else f" {'n/a':>10s}"
            lines.append(row)
    return "\n".join(lines)


def overhead_table(res):
    """Per-call overhead, one block per shape (results before "shapes": the one shape)."""
    lines = ["", f"Per-call overhead, training forward, float32 (median of {res['samples']} "
                 f"samples of {res['calls_per_sample']} calls)"]
    for rec in res.get("shapes", [res]):
        lines.append(f" {tuple(rec['shape'])}")
        for name, us in rec["us_per_call"].items():
            lines.append(f"  {name:40s} {us:8.1f} us")
        lines.append(f"  tfbn / FusedBatchNormV3: eager {rec['ratio_eager']:.2f} "
                     f"(raw op {rec['ratio_eager_raw_op']:.2f}), "
                     f"tf.function {rec['ratio_tf_function']:.2f}  (< 1: tfbn costs less)")
    return "\n".join(lines)


def e2e_table(res):
    lines = ["", f"End to end: ResNet-style CNN on sklearn digits, {res['epochs']} epochs, "
                 f"batch {res['batch_size']}, {res['train_images']} train / "
                 f"{res['val_images']} validation images"]
    for name, m in res["models"].items():
        steps = f", {m['steps_per_s']:5.1f} steps/s" if "steps_per_s" in m else ""
        lines.append(f"  {name:9s} BatchNormalization: {m['images_per_s']:8.0f} images/s"
                     f"{steps} (first epoch {m['first_epoch_s']:.1f} s), "
                     f"validation accuracy {100 * m['val_accuracy']:.1f}%")
    lines.append(f"  tfbn / keras throughput: {res['speedup']:.2f}x, accuracy gap "
                 f"{res['accuracy_gap_points']:+.1f} points")
    if "xla" in res:
        lines.append("  with XLA (jit_compile=True), steps/s ratios: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in res["xla"].items() if k != "accuracy_gap_points"))
    if "op_under_xla" in res:
        o = res["op_under_xla"]
        ms = o["median_ms"]
        lines.append(f"  one BatchNorm under XLA, {tuple(o['shape'])} {o['dtype']} {o['mode']}: "
                     f"tfbn {ms['tfbn']:.1f} ms, FusedBatchNormV3 {ms['FusedBatchNormV3']:.1f} ms "
                     f"({o['speedup_vs_fused_v3']:.2f}x), median of {o['reps']}")
    return "\n".join(lines)


def write_json(path, meta, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, **payload}, f, indent=1)
        f.write("\n")


def _chart_panels(records):
    """pyplot (Agg backend), NumPy, a figure with one panel per (dtype, mode) of records
    (rows dtypes, columns modes), its axes, and the panels as (ax, records, first column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = _groups(records)
    dtypes = list(dict.fromkeys(d for d, _ in groups))
    modes = list(dict.fromkeys(m for _, m in groups))
    fig, axes = plt.subplots(len(dtypes), len(modes), squeeze=False, sharey=True,
                             figsize=(5.5 * len(modes), 3.8 * len(dtypes)))
    panels = []
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            recs = groups.get((dtype, mode), [])
            axes[i][j].set_xticks(np.arange(len(recs)))
            axes[i][j].set_xticklabels([f"{_shape(r)}\n{r['layout']}" for r in recs],
                                       rotation=90, fontsize=6)
            axes[i][j].set_title(f"{dtype} - {mode}", fontsize=9)
            panels.append((axes[i][j], recs, j == 0))
    return plt, np, fig, axes, panels


def _save_chart(plt, fig, title, path):
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speedup_chart(records, path):
    """Speedup of tfbn over each anchor per shape: rows dtypes, columns modes, log scale."""
    from matplotlib import ticker

    plt, np, fig, axes, panels = _chart_panels(records)
    width = 0.8 / len(ANCHORS)
    for ax, recs, first_column in panels:
        pos = np.arange(len(recs))
        for k, anchor in enumerate(ANCHORS):
            vals = [r["results"][anchor].get("speedup", np.nan) for r in recs]
            # Bars grow from 1x, up where tfbn is faster and down where it is slower.
            ax.bar(pos + (k - (len(ANCHORS) - 1) / 2) * width, np.array(vals) - 1.0, width,
                   bottom=1.0, label=anchor)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        if first_column:
            ax.set_ylabel("speedup of tfbn (x)")
    speedups = [rec["results"][a]["speedup"] for rec in records for a in ANCHORS
                if "speedup" in rec["results"][a]]
    if speedups:  # 0.5x and 2x always show, so that below and above 1 read at a glance
        axes[0][0].set_ylim(min(0.5, min(speedups) / 1.25), max(2.0, max(speedups) * 1.25))
    axes[0][0].legend(fontsize=7)
    _save_chart(plt, fig, "tfbn speedup per shape over each anchor (> 1: tfbn faster; "
                "missing: n/a)", path)


FLOOR_BARS = ("tfbn", "tfbn_core", "fused_v3")


def floors_chart(records, path):
    """Per shape, each of FLOOR_BARS as % of the DRAM floor (100%: as fast as streaming the
    mode's least traffic from DRAM), with the cache floor marked on the same scale (where a
    kernel moving that traffic at the cache copy's bandwidth would be): rows dtypes, columns
    modes."""
    plt, np, fig, axes, panels = _chart_panels(records)
    width = 0.8 / len(FLOOR_BARS)
    for ax, recs, first_column in panels:
        pos = np.arange(len(recs))
        for k, name in enumerate(FLOOR_BARS):
            vals = [r["results"].get(name, {}).get(
                "pct_dram_floor", r["results"].get(name, {}).get("pct_floor", np.nan))
                for r in recs]
            ax.bar(pos + (k - (len(FLOOR_BARS) - 1) / 2) * width, vals, width, label=name)
        cache = [100.0 * r["cache_gbps"] / r["dram_gbps"] if "cache_gbps" in r else np.nan
                 for r in recs]
        ax.plot(pos, cache, "k_", markersize=18, label="cache floor")
        ax.axhline(100.0, color="black", linewidth=0.8, label="DRAM floor")
        for p, r in zip(pos, recs):
            if r.get("fits_llc"):
                ax.annotate("LLC", (p, 0), ha="center", va="bottom", fontsize=6)
        if first_column:
            ax.set_ylabel("% of the DRAM floor")
    axes[0][0].legend(fontsize=7)
    _save_chart(plt, fig, "Time of the floor / time (higher is faster; LLC: the traffic fits "
                "the last-level cache)", path)
