"""Benchmark chunk_gla (vector and scalar decay) against fla 0.6.0's chunk_gla / chunk_simple_gla and torch SDPA.

    python benchmarks/bench_gla.py            # bf16, B16xT2048 and B4xT8192 at H4xD256 and H16xD128
    SHAPES=4x8192x4x256 python benchmarks/bench_gla.py   # chosen shapes only (BxTxHxD, comma-separated)
    FLA_SHAPES= python benchmarks/bench_gla.py            # fla at these shapes only (default SHAPES; empty: none)
    FLA_KERNELS=gla python benchmarks/bench_gla.py        # fla's vector (gla) or scalar (simple_gla) kernels only

Prints the card, torch, triton and the code (provenance.py) first, one table last; writes $OUT/bench_gla.json when OUT is set.
TFLOP/s counts the chunked algorithm's matmul work (see `gla_flops`), so it compares kernels of one family only.
fla's kernels autotune on their first call (several minutes for all shapes): give the run 10 minutes, or reuse
configs that earlier runs tuned (fla_cache.py).
"""
from __future__ import annotations

import json
import os
import traceback

import fla_cache
import provenance
import torch
import torch.nn.functional as F
import triton
from linear_moe.kernels.gla import chunk_gla
from triton.testing import do_bench

SHAPES = [tuple(map(int, s.split("x"))) for s in
          os.environ.get("SHAPES", "16x2048x4x256,4x8192x4x256,16x2048x16x128,4x8192x16x128").split(",")]
FLA_SHAPES = [tuple(map(int, s.split("x"))) for s in os.environ["FLA_SHAPES"].split(",") if s] \
    if "FLA_SHAPES" in os.environ else SHAPES
FLA_KERNELS = os.environ.get("FLA_KERNELS", "gla,simple_gla").split(",")


def header() -> None:
    provenance.header()
    try:
        import fla

        print(f"fla: {getattr(fla, '__version__', '?')}, {fla_cache.describe()}")
    except Exception as e:  # noqa: BLE001
        print(f"fla: n/a ({type(e).__name__}: {e})")


def gla_flops(B: int, T: int, H: int, K: int, V: int, BT: int = 64) -> float:
    """Forward matmul FLOPs of the chunked algorithm: states (k^T v), inter (q h), scores (q k^T), A v."""
    return 2.0 * B * T * H * (2 * K * V + BT * K + BT * V)


def fla_fns():
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.gla import chunk_gla as fla_gla
        from fla.ops.simple_gla import chunk_simple_gla as fla_simple

        # fla refuses simple_gla's gated backward on Hopper with Triton < 3.7.1 (a Triton miscompile); for timing
        # only, as in bench_delta_rule.py
        fla_chunk_o.TRITON_ABOVE_3_7_1 = True
    except Exception as e:  # noqa: BLE001
        return None, None, f"{type(e).__name__}: {e}"
    return fla_gla, fla_simple, None


def measure(fwd, inputs):
    """(ms fwd, ms fwd+bwd, peak GiB of one fwd+bwd)."""
    def step():
        out = fwd(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(do)

    o = fwd(*inputs)
    o = o[0] if isinstance(o, tuple) else o
    do = torch.randn_like(o)
    # medians, as bench_delta_rule.py and bench_mom.py take (do_bench's default is the mean)
    with torch.no_grad():
        ms_f = do_bench(lambda: fwd(*inputs), warmup=25, rep=100, return_mode="median")
    ms_fb = do_bench(step, warmup=25, rep=100, grad_to_none=list(inputs), return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return ms_f, ms_fb, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    fla_cache.setup()
    header()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU; nothing measured")
        return
    fla_gla, fla_simple, fla_err = fla_fns()
    rows = []
    dt = torch.bfloat16
    # ours and SDPA at every shape first, fla after: a miscompiled fla kernel (its Hopper guard is lifted for timing)
    # that writes out of bounds must not take our rows down with it
    for with_fla, (B, T, H, D) in [(False, s) for s in SHAPES] + [(True, s) for s in FLA_SHAPES]:
        if with_fla and fla_gla is None:
            break
        torch.manual_seed(42)
        dev = "cuda"
        q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dt).requires_grad_() for _ in range(3))
        gv = F.logsigmoid(torch.randn(B, T, H, D, device=dev)).div(16).requires_grad_()
        gs = F.logsigmoid(torch.randn(B, T, H, device=dev)).requires_grad_()
        hs = H * D // 128
        if with_fla:
            cands = [
                ("fla gla", lambda q, k, v, g: fla_gla(q, k, v, g), (q, k, v, gv), None),
                ("fla simple_gla", lambda q, k, v, g: fla_simple(q, k, v, g), (q, k, v, gs), None),
            ]
            cands = [c for c in cands if c[0][4:] in FLA_KERNELS]
        else:
            # SDPA at equal hidden size H*D with head dim 128, causal, [B, heads, T, 128]
            qa, ka, va = (torch.randn(B, hs, T, 128, device=dev, dtype=dt).requires_grad_() for _ in range(3))
            cands = [
                ("ours chunk_gla vector", lambda q, k, v, g: chunk_gla(q, k, v, g), (q, k, v, gv), "fla gla"),
                ("ours chunk_gla scalar", lambda q, k, v, g: chunk_gla(q, k, v, g), (q, k, v, gs), "fla simple_gla"),
                ("torch sdpa causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                 (qa, ka, va), None),
            ]
        for name, fn, inputs, ref in cands:
            row = {"shape": f"B{B}xT{T} H{H}xD{D}", "kernel": name}
            try:
                ms_f, ms_fb, gib = measure(fn, inputs)
                if name.startswith("torch sdpa"):
                    flops = 4.0 * B * hs * T * T * 128 / 2
                else:
                    flops = gla_flops(B, T, H, D, D)
                row.update(ms_fwd=ms_f, ms_fwd_bwd=ms_fb, tokens_per_s=B * T / (ms_fb * 1e-3),
                           tflops=3 * flops / (ms_fb * 1e-3) / 1e12, peak_gib=gib)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                traceback.print_exc()
            row["ref"] = ref
            rows.append(row)
            print(f"measured {row['shape']} {name}: {row.get('ms_fwd_bwd', row.get('error'))}", flush=True)
        del q, k, v, gv, gs
        torch.cuda.empty_cache()
    times = {(r["shape"], r["kernel"]): r["ms_fwd_bwd"] for r in rows if "ms_fwd_bwd" in r}
    for row in rows:
        ref = row.pop("ref")
        if (row["shape"], ref) in times and "ms_fwd_bwd" in row:
            row[f"x vs {ref}"] = times[(row["shape"], ref)] / row["ms_fwd_bwd"]
    if fla_err:
        print(f"fla 0.6.0: n/a ({fla_err})")
    print(f"\n{'shape':<18} {'kernel':<24} {'ms fwd':>8} {'ms f+b':>8} {'Mtok/s':>8} {'TFLOP/s':>8} {'peak GiB':>8}"
          f"  speedup vs fla (f+b)")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<18} {r['kernel']:<24} error: {r['error']}")
            continue
        sp = next((f"{v:.2f}x ({k[5:]})" for k, v in r.items() if k.startswith("x vs")), "")
        print(f"{r['shape']:<18} {r['kernel']:<24} {r['ms_fwd']:8.2f} {r['ms_fwd_bwd']:8.2f} "
              f"{r['tokens_per_s'] / 1e6:8.2f} {r['tflops']:8.1f} {r['peak_gib']:8.2f}  {sp}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_gla.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
