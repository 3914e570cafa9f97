"""Where the GPU time goes: per-kernel times of our delta-rule kernels under launch/block variants, and per-op times of
the gated DeltaNet and MoM layers (bf16, hidden 2048, 4 heads x 256, 32768 tokens), from torch.profiler.

Run: python benchmarks/profile_gpu.py [kernels] [layers] [conv] [proj]   [VARIANTS=default,warps8,...]
     [KERNEL_SHAPES=16x2048x4x256,1x98304x4x256,...]
     [CONV_VARIANTS=default,bt16,...]   (JSON in $OUT when set; PROFILE="conv layers" stands in for the arguments)
Use it to choose kernel launch settings (kernels/delta_rule/chunk.py LAUNCH, kernels/short_conv.py LAUNCH) and to find
layer overheads; the numbers to report come from bench_*.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

OUT = os.environ.get("OUT")


def cuda_times(fn, iters: int = 5, ops: bool = False) -> dict[str, float]:
    """ms per iteration of every CUDA kernel that `fn` launches (summed by kernel name), after one warm-up call.

    ops: also print the torch ops (with input shapes) that own the most CUDA time, to tell which copy or cat it is."""
    fn()
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if ops else [])
    with profile(activities=acts, record_shapes=ops) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    if ops:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_device_time_total", row_limit=25,
                                                                  max_name_column_width=40,
                                                                  max_shapes_column_width=90))
    times: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name[:60]] += e.device_time / 1e3 / iters
    return dict(times)


def show(title: str, times: dict[str, float], top: int = 18) -> None:
    total = sum(times.values())
    print(f"\n-- {title}: {total:.2f} ms of kernels per iteration")
    for name, ms in sorted(times.items(), key=lambda x: -x[1])[:top]:
        print(f"{ms:8.3f} ms {100 * ms / total:5.1f}%  {name}")


@contextlib.contextmanager
def launch_settings(table: dict, changes: dict):
    """`changes` applied to `table` inside the block, the old values restored after it: a kernel module's LAUNCH
    table, or its namespace `vars(module)` for module constants (STATE_GROUP_PROGRAMS_PER_SM, DA_FP32, ...)."""
    base = {k: table[k] for k in changes}
    table.update(changes)
    try:
        yield
    finally:
        table.update(base)


def kernels() -> list[dict]:
    """fwd+bwd kernel times of the gated delta rule under LAUNCH variants: dense batches, and MoM's packing (98304
    slots in 80 uneven segments) at H4 x D256."""
    from linear_moe.kernels.delta_rule import chunk as mod

    rows = []
    shapes = [(16, 2048, 4, 256), (4, 8192, 4, 256), (4, 8192, 16, 128), (1, 98304, 4, 256)]
    if os.environ.get("KERNEL_SHAPES"):  # e.g. 1x98304x4x256 (the packed MoM shape)
        shapes = [tuple(int(n) for n in sh.split("x")) for sh in os.environ["KERNEL_SHAPES"].split(",")]
    gen = torch.Generator().manual_seed(0)
    cuts = torch.randperm(98303, generator=gen)[:79].add(1).sort().values
    mom_cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([98304])]).cuda()

    def state(bucket=256, **options):
        """STATE_LAUNCH with the named kernels' options at one K bucket (128 or 256) replaced."""
        return {name: {**bk, **({bucket: options[name]} if name in options else {})}
                for name, bk in mod.STATE_LAUNCH.items()}

    # (name, LAUNCH changes, module settings, blocks)
    variants = [
        ("default", {}, {}, (64, 64, 64)),
        ("no-head-groups", {}, {"STATE_GROUP_PROGRAMS_PER_SM": 10**9}, (64, 64, 64)),
        ("head-groups-8", {}, {"STATE_GROUP_PROGRAMS_PER_SM": 8}, (64, 64, 64)),
        ("in-order", {}, {"STATE_LONGEST_FIRST": False}, (64, 64, 64)),
        ("in-order-no-groups", {}, {"STATE_LONGEST_FIRST": False, "STATE_GROUP_PROGRAMS_PER_SM": 10**9},
         (64, 64, 64)),
        ("warps8", {k: (8, s) for k, (_, s) in mod.LAUNCH.items()}, {}, (64, 64, 64)),
        ("BK128", {}, {}, (64, 128, 64)),
        ("stages2", {k: (w, 2) for k, (w, _) in mod.LAUNCH.items() if k not in ("h", "dh")}, {}, (64, 64, 64)),
        # the state kernels at K = 256 in one (V-block, stages) option each (STATE_LAUNCH): the one-stage dh that
        # reads the forward's scores, the two-stage one that recomputes them, the 32-wide one-stage launches of before
        ("dh-32x1", {}, {"STATE_LAUNCH": state(dh=[(32, 1)])}, (64, 64, 64)),
        ("dh-32x2", {}, {"STATE_LAUNCH": state(dh=[(32, 2)])}, (64, 64, 64)),
        ("h-32x1-dh-32x1", {}, {"STATE_LAUNCH": state(h=[(32, 1)], dh=[(32, 1)])}, (64, 64, 64)),
        ("h-32x2", {}, {"STATE_LAUNCH": state(h=[(32, 2)])}, (64, 64, 64)),
        ("state-warps8", {"h": (8, None), "dh": (8, None)}, {}, (64, 64, 64)),
        # at K = 128, a 32-wide V-block where a launch is short of programs (B4 x T8192 x H16: 128 at BV 64), as
        # the K = 256 options have; and the per-chunk kernels in fewer warps (GLA's intra-chunk backward: one beat four)
        ("k128-state-32x2", {}, {"STATE_LAUNCH": state(128, h=[(64, 2), (32, 2)], dh=[(64, 3), (32, 2)])},
         (64, 64, 64)),
        ("chunk-warps2", {k: (2, s) for k, (_, s) in mod.LAUNCH.items() if k not in ("h", "dh")}, {}, (64, 64, 64)),
        ("chunk-warps1", {k: (1, s) for k, (_, s) in mod.LAUNCH.items() if k not in ("h", "dh")}, {}, (64, 64, 64)),
    ]
    only = os.environ.get("VARIANTS")
    variants = [v for v in variants if not only or v[0] in only.split(",")]
    for B, T, H, D in shapes:
        cu = mom_cu if B * T == 98304 else None
        q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).bfloat16().requires_grad_()
        v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
        g = F.logsigmoid(torch.randn(B, T, H, device="cuda")).requires_grad_()
        label = f"B{B}xT{T}xH{H}xD{D}" + ("-80seg" if cu is not None else "")
        for name, launch, settings, (BT, BK, BV) in variants:

            def fb(q=q, k=k, v=v, beta=beta, g=g, BT=BT, BK=BK, BV=BV, cu=cu):
                o, _ = mod.chunk_delta_rule(q, k, v, beta, g, chunk_size=BT, block_k=BK, block_v=BV, cu_seqlens=cu,
                                            check_inputs=False)
                o.backward(torch.ones_like(o))

            try:
                with launch_settings(mod.LAUNCH, launch), launch_settings(vars(mod), settings):
                    t = cuda_times(fb)
            except Exception as e:  # noqa: BLE001 (a variant that does not fit is reported, the rest still run)
                print(f"{name} {label}: {type(e).__name__}: {str(e)[:200]}")
                continue
            show(f"gated delta rule fwd+bwd {name} {label}", t, top=8)
            rows.append({"variant": name, "shape": label, "ms": sum(t.values()), "kernels": t})
    print("\n== kernel variants (fwd+bwd kernel ms, gated; h / dh: the state kernels)")
    for r in rows:
        kt = r["kernels"]
        print(f"{r['variant']:18} {r['shape']:24} {r['ms']:8.3f}   h {kt.get('chunk_delta_rule_fwd_kernel_h', 0):6.3f}"
              f"   dh {kt.get('chunk_delta_rule_bwd_kernel_dh', 0):6.3f}")
    return rows


def layers() -> list[dict]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_mom

    bench_mom.init_megatron()
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones((), device="cuda"))
    rows = []
    for name in ("gdn", "mom_4x2_shared"):
        torch.manual_seed(0)
        m = bench_mom.LAYERS[name]().to("cuda", torch.bfloat16).train()
        x = bench_mom.layer_input(m, 16, 2048)

        def fb(m=m, x=x):
            m(x).float().sum().backward()

        t = cuda_times(fb, iters=3, ops=True)
        show(f"layer {name} fwd+bwd B16xT2048", t, top=30)
        rows.append({"layer": name, "ms": sum(t.values()), "kernels": t})
    return rows


def conv() -> list[dict]:
    """The short conv (bf16, W = 4, SiLU) under LAUNCH variants (BT, BC, warps, steps) for its forward and backward
    kernels: GDN's strided view of the in_proj output (4 units of 768 conv channels in 1026, [T, B] order), the same
    channels contiguous, a packed [1, 98304, 3072] batch of 80 uneven segments, and MoM's q: packed [1, 98304, 4, 256]
    with each head L2-normalised in the conv (the "norm-*" variants). GB/s counts x read and y written
    (fwd), x and dy read and dx written (bwd)."""
    from linear_moe.kernels import short_conv as mod
    from linear_moe.kernels.norms import L2NORM_EPS

    variants = {
        "default": {},
        "dx64": {"dx": (32, 64, 4, 1)},
        "steps4": {"dact": (32, 128, 4, 4), "dx": (32, 128, 4, 4)},
        "w8": {"fwd": (32, 128, 8, 4), "dact": (32, 128, 8, 1), "dx": (32, 128, 8, 1)},
        "fwd-bc256": {"fwd": (16, 256, 8, 4)},
        # dx: one warp over 256 channels (default, 8 rows x 8 steps), longer or shorter loops, the old 4-warp tiles
        "dx-16x256w1s4": {"dx": (16, 256, 1, 4)},
        "dx-8x256w1s16": {"dx": (8, 256, 1, 16)},
        "dx-4x256w1s16": {"dx": (4, 256, 1, 16)},
        "dx-32x128w4s1": {"dx": (32, 128, 4, 1)},
        "dact-8x256w1s8": {"dact": (8, 256, 1, 8)},
        # with the L2 norm
        "norm-bt32": {"fwd_norm": (32, 0, 8, 4), "dact_norm": (32, 0, 8, 1)},
        "norm-bt16": {"fwd_norm": (16, 0, 4, 4), "dact_norm": (16, 0, 4, 1)},
        "norm-w8": {"fwd_norm": (16, 0, 8, 4), "dact_norm": (16, 0, 8, 1)},
        # not a launch: da stored in fp32 instead of x's dtype (DA_FP32)
        "da32": {"DA_FP32": True},
        "norm-da32": {"DA_FP32": True},
    }
    only = os.environ.get("CONV_VARIANTS")
    variants = {k: v for k, v in variants.items() if not only or k in only.split(",")}
    gen = torch.Generator().manual_seed(0)
    cuts = torch.randperm(98303, generator=gen)[:79].add(1).sort().values
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([98304])]).cuda()
    shapes = {
        "gdn-view-B16xT2048": (lambda: torch.randn(2048, 16, 4 * 1026, device="cuda", dtype=torch.bfloat16)
                               .transpose(0, 1).reshape(16, 2048, 4, 1026)[..., :768], None),
        "contig-B16xT2048": (lambda: torch.randn(16, 2048, 3072, device="cuda", dtype=torch.bfloat16), None),
        "packed-T98304-80seg": (lambda: torch.randn(1, 98304, 3072, device="cuda", dtype=torch.bfloat16), cu),
        # MoM's q (or k): 4 heads of 256, each L2-normalised in the conv
        "packed-norm-H4xK256": (lambda: torch.randn(1, 98304, 4, 256, device="cuda", dtype=torch.bfloat16), cu),
    }
    rows = []
    for shape, (make, cu_seqlens) in shapes.items():
        x = make().detach().requires_grad_()
        C = x.shape[2] * (x.shape[3] if x.dim() == 4 else 1)
        eps = L2NORM_EPS if "norm" in shape else None
        w = (torch.randn(C, 4, device="cuda") * 0.5).bfloat16().requires_grad_()
        dy = torch.randn(x.shape[0], x.shape[1], C, device="cuda", dtype=torch.bfloat16)
        n = dy.numel() * dy.element_size()
        for name, launch in variants.items():
            if name != "default" and name.startswith("norm") != (eps is not None):
                continue  # a variant of the other kind of conv ("norm-*": with the L2 norm)
            settings = {k: launch[k] for k in ("DA_FP32",) if k in launch}
            launch = {k: v for k, v in launch.items() if k not in settings}

            def f(x=x, w=w, cu_seqlens=cu_seqlens, eps=eps):
                return mod.short_conv(x, w, cu_seqlens=cu_seqlens, l2norm_eps=eps)

            def fb(x=x, w=w, dy=dy, f=f):
                torch.autograd.grad(f(), (x, w), dy)

            try:
                with launch_settings(mod.LAUNCH, launch), launch_settings(vars(mod), settings):
                    tf, tfb = cuda_times(f, iters=10), cuda_times(fb, iters=10)
            except Exception as e:  # noqa: BLE001 (a variant that does not fit is reported, the rest still run)
                print(f"conv {name} {shape}: {type(e).__name__}: {str(e)[:200]}")
                continue
            ms_f, ms_fb = sum(tf.values()), sum(tfb.values())
            rows.append({"variant": name, "shape": shape, "launch": launch, "ms_fwd": ms_f, "ms_fwd_bwd": ms_fb,
                         "gbs_fwd": 2 * n / ms_f / 1e6, "gbs_bwd": 3 * n / (ms_fb - ms_f) / 1e6, "kernels": tfb})
    print("\n== short conv variants (bf16, W 4, SiLU; kernel ms, effective GB/s)")
    print(f"{'variant':10} {'shape':20} {'fwd ms':>7} {'GB/s':>6} {'fwd+bwd':>8} {'bwd ms':>7} {'GB/s':>6}  launch")
    for r in rows:
        print(f"{r['variant']:10} {r['shape']:20} {r['ms_fwd']:7.3f} {r['gbs_fwd']:6.0f} {r['ms_fwd_bwd']:8.3f} "
              f"{r['ms_fwd_bwd'] - r['ms_fwd']:7.3f} {r['gbs_bwd']:6.0f}  {r['launch']}")
    return rows


class GatherSlots(torch.autograd.Function):
    """x [N, h] -> its rows in slot order, x[slot_token] [N * k, h]; the backward sums each token's k slot rows
    (gathered through the inverse order) instead of `index_add_`'s scatter: no atomics, each dx row written once."""

    @staticmethod
    def forward(ctx, x, slot_token, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, slot_token)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse)  # [N * k, h], token-major: row t * k + j is token t's j-th slot
        return rows.view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


def proj() -> list[dict]:
    """MoM's in_proj at the benchmark shape (32768 tokens, hidden 2048, 4 heads x 256, M = 4 top-2 + shared): one
    dense GEMM projecting every token for all 5 memories, against a dense GEMM for q, the gate and the shared memory
    plus a grouped GEMM (torch._grouped_mm) over the 65536 routed slots gathered in memory order, the gather's
    backward either `index_add_` (index_select's) or a sum of each token's k rows (`GatherSlots`)."""
    N, hid, H, D, M, k = 32768, 2048, 4, 256, 4, 2
    mem = H * (2 * D + 2)
    x = torch.randn(N, hid, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_all = (torch.randn(2 * H * D + (M + 1) * mem, hid, device="cuda") * 0.02).bfloat16().requires_grad_()
    w_dense = (torch.randn(2 * H * D + mem, hid, device="cuda") * 0.02).bfloat16().requires_grad_()
    w_routed = (torch.randn(M, mem, hid, device="cuda") * 0.02).bfloat16().requires_grad_()
    memories = torch.rand(N, M, device="cuda").topk(k, dim=1).indices
    order = memories.reshape(-1).argsort(stable=True)
    src = order // k
    offs = torch.bincount(memories.reshape(-1), minlength=M).cumsum(0).to(torch.int32)

    def dense():
        return x @ w_all.t()

    inverse = order.argsort()

    def routed():
        xs = x.index_select(0, src)
        return x @ w_dense.t(), torch._grouped_mm(xs, w_routed.transpose(-2, -1), offs=offs)

    def routed_sum():
        xs = GatherSlots.apply(x, src, inverse, k)
        return x @ w_dense.t(), torch._grouped_mm(xs, w_routed.transpose(-2, -1), offs=offs)

    def fb(f):
        outs = f()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    rows = []
    for name, f in (("dense all memories", dense), ("dense + grouped routed", routed),
                    ("dense + grouped, row-sum", routed_sum)):
        with torch.no_grad():
            tf = cuda_times(f, iters=10)
        tfb = cuda_times(lambda f=f: fb(f), iters=10)
        rows.append({"variant": name, "ms_fwd": sum(tf.values()), "ms_fwd_bwd": sum(tfb.values()), "kernels": tfb})
        show(f"proj {name} fwd+bwd", tfb, top=10)
    print("\n== MoM in_proj (32768 tokens, bf16)")
    for r in rows:
        print(f"{r['variant']:26} fwd {r['ms_fwd']:6.3f} ms  fwd+bwd {r['ms_fwd_bwd']:6.3f} ms")
    return rows


def main() -> None:
    what = sys.argv[1:] or os.environ.get("PROFILE", "kernels layers").split()
    print("GPU", torch.cuda.get_device_name(), "| torch", torch.__version__)
    res = {}
    if "kernels" in what:
        res["kernels"] = kernels()
    if "layers" in what:
        res["layers"] = layers()
    if "conv" in what:
        res["conv"] = conv()
    if "proj" in what:
        res["proj"] = proj()
    if OUT:
        with open(os.path.join(OUT, "profile_gpu.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
