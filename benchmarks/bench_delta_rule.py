"""Benchmark the chunked delta rule (gated and plain) against fla 0.6.0 and SDPA flash attention, bf16, one GPU.

Run: python benchmarks/bench_delta_rule.py   (optional: SHAPES=16x2048x4x256,... ; FLA_SHAPES=... the shapes fla runs
at, default SHAPES, empty: none, as its autotuning takes minutes; fla_cache.py: reuse its autotuned configs; JSON
rows go to $OUT when set)
TFLOP/s is a model count: forward 2 * (3 K V + BT (3 K + 2 V)) per token and head (BT = 64), fwd+bwd 3x that;
SDPA causal: 2 T^2 D per head forward, 3.5x that for fwd+bwd.
"""
import json
import os

import fla_cache
import provenance
import torch
import torch.nn.functional as F
import triton
from linear_moe.kernels.delta_rule import chunk_delta_rule


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def inputs(B, T, H, D, gated, dt=torch.bfloat16):
    q = torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=True)
    k = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).to(dt).requires_grad_()
    v = torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=True)
    beta = torch.rand(B, T, H, device="cuda", dtype=dt).sigmoid().requires_grad_()
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda")).requires_grad_() if gated else None
    return q, k, v, beta, g


def measure(run_fwd, leaves):
    def fwd():
        with torch.no_grad():
            run_fwd()

    def fb():
        o = run_fwd()
        o.backward(torch.ones_like(o))
        for x in leaves:
            x.grad = None

    fb()
    t_fb = bench(fb)
    # the peak of one step on its own: do_bench's 256 MB buffer for flushing the L2 cache is not the kernel's
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fb()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    return bench(fwd), t_fb, peak


def main():
    fla_cache.setup()
    provenance.header(fla_cache.describe())
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.delta_rule import chunk_delta_rule as fla_delta
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gated

        # fla refuses its gated backward on Hopper with Triton < 3.7.1 (a Triton miscompile); for timing only
        fla_chunk_o.TRITON_ABOVE_3_7_1 = True
    except Exception as e:  # noqa: BLE001 (fla is optional)
        print("fla unavailable:", repr(e)[:200])
        fla_delta = fla_gated = None
    shapes = [tuple(map(int, s.split("x"))) for s in
              os.environ.get("SHAPES", "16x2048x4x256,4x8192x4x256,16x2048x16x128,4x8192x16x128").split(",")]
    fla_shapes = [tuple(map(int, s.split("x"))) for s in os.environ["FLA_SHAPES"].split(",") if s] \
        if "FLA_SHAPES" in os.environ else shapes
    rows = []
    # ours and SDPA at every shape first, fla after: fla's gated backward runs with its Hopper guard lifted, and a
    # miscompiled kernel that writes out of bounds must not take our rows down with it
    for B, T, H, D in shapes:
        rows += measure_shape(B, T, H, D, ours=True)
    if fla_gated is not None:
        for B, T, H, D in fla_shapes:
            rows += measure_shape(B, T, H, D, ours=False, fla=(fla_gated, fla_delta))
    report(rows)


def measure_shape(B, T, H, D, ours, fla=None):
    shape = f"B{B}xT{T}xH{H}xD{D}"
    flop_f = 2 * (3 * D * D + 64 * 5 * D) * B * T * H
    rows, cases = [], []
    for gated in (True, False):
        tag = "gated" if gated else "plain"
        if ours:
            cases.append((f"ours_{tag}", gated, lambda q, k, v, b, g: chunk_delta_rule(q, k, v, b, g)[0]))
        elif gated:
            cases.append((f"fla_{tag}", gated, lambda q, k, v, b, g: fla[0](q, k, v, g, b)[0]))
        else:
            cases.append((f"fla_{tag}", gated, lambda q, k, v, b, g: fla[1](q, k, v, b)[0]))
    for name, gated, fn in cases:
        try:
            q, k, v, beta, g = inputs(B, T, H, D, gated)
            leaves = [x for x in (q, k, v, beta, g) if x is not None]
            t_f, t_fb, peak = measure(lambda fn=fn, q=q, k=k, v=v, beta=beta, g=g: fn(q, k, v, beta, g), leaves)
            rows.append({"kernel": name, "shape": shape, "fwd_ms": t_f, "fwdbwd_ms": t_fb, "peak_gib": peak,
                         "tok_s": B * T / t_fb * 1e3, "tflops": 3 * flop_f / t_fb * 1e-9})
        except Exception as e:  # noqa: BLE001 (report the row, keep going)
            rows.append({"kernel": name, "shape": shape, "error": repr(e)[:300]})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    if not ours:
        return rows
    try:
        hd = 128
        nh = H * D // hd
        q, k, v = (torch.randn(B, nh, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        t_f, t_fb, peak = measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v])
        fl = 2 * B * nh * T * T * hd
        rows.append({"kernel": f"sdpa_{nh}x{hd}", "shape": shape, "fwd_ms": t_f, "fwdbwd_ms": t_fb,
                     "peak_gib": peak, "tok_s": B * T / t_fb * 1e3, "tflops": 3.5 * fl / t_fb * 1e-9})
    except Exception as e:  # noqa: BLE001 (a row that fails is reported, the rest still run)
        rows.append({"kernel": "sdpa", "shape": shape, "error": repr(e)[:300]})
    print(json.dumps(rows[-1]), flush=True)
    torch.cuda.empty_cache()
    return rows


def report(rows):
    by = {(r["kernel"], r["shape"]): r for r in rows}
    for r in rows:
        if r["kernel"].startswith("ours_"):
            other = by.get(("fla_" + r["kernel"][5:], r["shape"]), {})
            if "fwdbwd_ms" in r and "fwdbwd_ms" in other:
                r["vs_fla_fwd"] = other["fwd_ms"] / r["fwd_ms"]
                r["vs_fla_fwdbwd"] = other["fwdbwd_ms"] / r["fwdbwd_ms"]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_delta_rule.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("\n== table (vs_fla = fla time / our time; > 1 means faster than fla)")
    print(f"{'kernel':14} {'shape':22} {'fwd_ms':>8} {'fwdbwd_ms':>10} {'tok/s':>12} {'TFLOP/s':>8} {'peakGiB':>8} "
          f"{'vs_fla_f':>10} {'vs_fla_fb':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:14} {r['shape']:22} ERROR {r['error'][:120]}")
            continue
        vf = f"{r['vs_fla_fwd']:.2f}" if "vs_fla_fwd" in r else ""
        vfb = f"{r['vs_fla_fwdbwd']:.2f}" if "vs_fla_fwdbwd" in r else ""
        print(f"{r['kernel']:14} {r['shape']:22} {r['fwd_ms']:8.3f} {r['fwdbwd_ms']:10.3f} {r['tok_s']:12.3g} "
              f"{r['tflops']:8.1f} {r['peak_gib']:8.2f} {vf:>10} {vfb:>10}")


if __name__ == "__main__":
    main()
