"""The split family on the GPU against the fused op on the same tensor: statistics ->
merge (one part) -> apply for the forward, gradient sums -> gradient apply for the backward,
each step a launch of tfbn._core's CUDA entry points (the collective that synchronized
BatchNorm puts between the steps is not timed). Called by bench.py."""

SHAPES = [(64, 56), (256, 28), (512, 14), (2048, 7)]  # (channels, spatial) at batch 256
EPS = 1e-5


def run_split_cases(core, torch, time_per_call, desc, min_ms, batch=256):
    """Returns one dict per case: fused and split times (us) and split / fused ratios."""
    results = []
    print(f"\nsplit path vs fused (batch {batch}, one part): time ratios split / fused", flush=True)
    print(f"{'C':>5} {'HW':>4} {'dtype':>8} {'layout':>13} | {'fwd':>6} {'bwd':>6} "
          f"{'f+b':>6} | fused f+b us", flush=True)
    for dtype in ("float32", "bfloat16"):
        for layout in ("channels_last", "contiguous"):
            for c, hw in SHAPES:
                r = _case(core, torch, time_per_call, desc, min_ms, batch, c, hw, dtype, layout)
                results.append(r)
                print(f"{c:>5} {hw:>4} {dtype:>8} {layout:>13} | {r['ratio']['forward']:>6.3f} "
                      f"{r['ratio']['backward']:>6.3f} {r['ratio']['fwd_bwd']:>6.3f} | "
                      f"{r['us']['fused_fwd_bwd']:>8.1f}", flush=True)
    return results


def _case(core, torch, time_per_call, desc, min_ms, batch, c, hw, dtype, layout):
    dev = "cuda"
    shape, axis = ((batch, hw, hw, c), -1) if layout == "channels_last" else ((batch, c, hw, hw), 1)
    x = torch.randn(shape, device=dev).mul_(2).add_(1).to(getattr(torch, dtype))
    dy = torch.randn_like(x)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    f32 = dict(dtype=torch.float32, device=dev)
    f64 = dict(dtype=torch.float64, device=dev)
    scale, offset = torch.rand(c, **f32) + 0.5, torch.randn(c, **f32)
    bm, bv, lo, ds, do, mean, var, mlo = (torch.empty(c, **f32) for _ in range(8))
    partial, count = torch.empty((1, 3, c), **f64), torch.empty(c, **f64)
    sums = torch.empty((2, c), **f64)
    fw = core.cuda_workspace_bytes(list(shape), dtype, axis=axis, training=True)
    bw = core.cuda_workspace_bytes(list(shape), dtype, axis=axis, backward=True)
    ws_t = torch.empty(4 * max(fw, bw) + (1 << 20), dtype=torch.uint8, device=dev)
    d = {k: desc(v) for k, v in dict(x=x, dy=dy, y=y, dx=dx, scale=scale, offset=offset, bm=bm,
                                       bv=bv, lo=lo, ds=ds, do=do, mean=mean, var=var, mlo=mlo,
                                       partial=partial, partial2=partial[0], count=count,
                                       sums=sums, ws=ws_t).items()}
    s = torch.cuda.current_stream().cuda_stream
    common = dict(axis=axis, stream=s, workspace=d["ws"])

    def fused_forward():
        core.cuda_batch_norm_forward(d["x"], d["scale"], d["offset"], y=d["y"],
                                     batch_mean=d["bm"], batch_variance=d["bv"],
                                     mean_lo=d["lo"], epsilon=EPS, **common)

    def fused_backward():
        core.cuda_batch_norm_backward(d["dy"], d["x"], d["scale"], d["bm"], d["bv"], d["lo"],
                                      dx=d["dx"], dscale=d["ds"], doffset=d["do"], epsilon=EPS,
                                      **common)

    def split_forward():
        core.cuda_partial_moments(d["x"], None, partial=d["partial2"], **common)
        core.cuda_merge_moments(d["partial"], mean=d["mean"], variance=d["var"],
                                mean_lo=d["mlo"], count=d["count"], stream=s)
        core.cuda_apply_statistics(d["x"], d["scale"], d["offset"], d["mean"], d["var"],
                                   d["mlo"], y=d["y"], epsilon=EPS, **common)

    def split_backward():
        core.cuda_grad_sums(d["dy"], d["x"], d["mean"], d["mlo"], sums=d["sums"], **common)
        core.cuda_apply_grad_with_sums(d["dy"], d["x"], d["scale"], d["mean"], d["var"],
                                       d["mlo"], d["sums"], d["sums"], d["count"], None,
                                       dx=d["dx"], dscale=d["ds"], doffset=d["do"],
                                       epsilon=EPS, **common)

    split_forward()  # the statistics the split backward reads
    t = {name: time_per_call(fn, min_ms) * 1e6 for name, fn in (
        ("fused_forward", fused_forward), ("split_forward", split_forward),
        ("fused_backward", fused_backward), ("split_backward", split_backward))}
    t["fused_fwd_bwd"] = t["fused_forward"] + t["fused_backward"]
    t["split_fwd_bwd"] = t["split_forward"] + t["split_backward"]
    return {"channels": c, "spatial": hw, "batch": batch, "dtype": dtype, "layout": layout,
            "us": t,
            "ratio": {"forward": t["split_forward"] / t["fused_forward"],
                      "backward": t["split_backward"] / t["fused_backward"],
                      "fwd_bwd": t["split_fwd_bwd"] / t["fused_fwd_bwd"]}}
