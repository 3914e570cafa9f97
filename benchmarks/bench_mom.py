"""MoM layer speed: our sync-free MoM vs our Gated DeltaNet layer, fla 0.6.0 MomAttention / GatedDeltaNet and SDPA.

bf16, hidden 2048, 4 heads x 256, expand_v 1, short conv, output gate, 32768 tokens per step. Each layer: ms of the
forward (no grad, eval), ms of forward + backward, tokens/s of fwd+bwd, peak GiB, and the fwd+bwd ratio to our Gated
DeltaNet layer at the same shape. fla and our Gated DeltaNet are optional (rows report their import error).

Run: python benchmarks/bench_mom.py  [SEQS=2048,8192] [TOKENS=32768] [LAYERS=mom_4x2,gdn,...]   (JSON rows in $OUT)
fla's layers autotune their kernels for minutes on first use: fla_cache.py keeps their configs (FLA_DUMP_DIR) for
later runs (FLA_CONFIG_DIR, FLA_CACHE_MODE=strict), as for the kernel benchmarks.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import traceback

import fla_cache
import provenance
import torch
import torch.nn.functional as F
from torch import nn

HID, HEADS, HEAD_DIM = 2048, 4, 256
DT = torch.bfloat16


def header() -> None:
    provenance.header(fla_cache.describe())


def init_megatron() -> None:
    """World size 1 with Megatron's parallel state (NCCL on GPU), as our layers need it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)


def ours(name: str, **overrides):
    """Build one of our registered mixers as Megatron builds it; it takes and returns [s, b, h]."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from linear_moe.registry import get_mixer

    tc = TransformerConfig(num_layers=1, hidden_size=HID, num_attention_heads=HEADS, use_cpu_initialization=False,
                           add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bf16=True,
                           params_dtype=DT, gradient_accumulation_fusion=False)
    cls = get_mixer(name)
    cfg = cls.Config(num_heads=HEADS, head_dim=HEAD_DIM, expand_v=1.0, use_short_conv=True, use_output_gate=True,
                     **overrides)
    layer = build_module(ModuleSpec(module=cls, params={"mixer_config": cfg}), config=tc, layer_number=1)
    return SeqFirst(layer)


class SeqFirst(nn.Module):
    """Our layer as a Megatron model runs it: contiguous [s, b, h] in, [s, b, h] out (the bias, None, dropped).

    Every layer is timed in its own native layout, contiguous: ours [s, b, h], fla's and SDPA [b, t, h]. Until
    2026-11-26 ours got a transposed view of a [b, t, h] tensor and returned one: the gated DeltaNet layer's H200
    profile shows four copies of [2048, 16, 2048] per fwd+bwd for it (0.67 ms), counted against our rows only."""

    seq_first = True

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


def layer_input(m: nn.Module, B: int, T: int) -> torch.Tensor:
    """A random input in the layer's native layout (`SeqFirst`), as a leaf that takes a gradient."""
    shape = (T, B, HID) if getattr(m, "seq_first", False) else (B, T, HID)
    return torch.randn(*shape, device="cuda", dtype=DT, requires_grad=True)


class SDPALayer(nn.Module):
    def __init__(self, hidden=HID, heads=16):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(o.transpose(1, 2).reshape(b, t, d))


def fla_layer(kind: str, **kw):
    import fla.ops.common.chunk_o as _co

    # fla refuses its gated backward on Hopper with Triton 3.4-3.7.0 (a Triton miscompile, fla #640); for timing
    # only, lift the guard: the times hold, its gradient values may not.
    _co.TRITON_ABOVE_3_7_1 = True
    if kind == "mom":
        from fla.layers.mom import MomAttention

        return MomAttention(hidden_size=HID, head_dim=HEAD_DIM, num_heads=HEADS, expand_v=1, shared_mem=True,
                            layer_idx=0, **kw)
    from fla.layers.gated_deltanet import GatedDeltaNet

    return GatedDeltaNet(hidden_size=HID, head_dim=HEAD_DIM, num_heads=HEADS, expand_v=1, layer_idx=0)


# In the order they run, each at every sequence length: ours and SDPA first, fla last (its gated backward runs with
# the Hopper guard lifted, and a miscompiled kernel that writes out of bounds must not take our rows down with it).
LAYERS = {
    "mom_4x2_shared": lambda: ours("mom", num_memories=4, topk=2, shared_memory=True),
    "gdn": lambda: ours("gated_deltanet"),
    "sdpa_attn": lambda: SDPALayer(),
    "mom_8x2_shared": lambda: ours("mom", num_memories=8, topk=2, shared_memory=True),
    "mom_16x4_shared": lambda: ours("mom", num_memories=16, topk=4, shared_memory=True),
    "fla_gdn": lambda: fla_layer("gdn"),
    "fla_mom_4x2_shared": lambda: fla_layer("mom", num_memories=4, topk=2),
    "fla_mom_8x2_shared": lambda: fla_layer("mom", num_memories=8, topk=2),
    "fla_mom_16x4_shared": lambda: fla_layer("mom", num_memories=16, topk=4),
}


def measure(ctor, B: int, T: int) -> dict:
    from triton.testing import do_bench

    torch.manual_seed(0)
    m = ctor().to("cuda", DT).train()
    x = layer_input(m, B, T)

    def fwd():
        o = m(x)
        return o[0] if isinstance(o, tuple) else o

    def fb():
        fwd().float().sum().backward()

    fb()
    t_fb = do_bench(fb, warmup=25, rep=100, return_mode="median")
    # the peak of one step on its own: do_bench's 256 MB buffer for flushing the L2 cache is not the layer's
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fb()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    m.eval()
    with torch.no_grad():
        t_f = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    return {"fwd_ms": round(t_f, 3), "fwdbwd_ms": round(t_fb, 3), "tok_s": round(B * T / t_fb * 1e3),
            "peak_gib": round(peak, 2)}


def main() -> None:
    fla_cache.setup()
    header()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    init_megatron()
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # the training loop sets this; without it the aux-loss backward creates it from a host value (a sync)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones((), device="cuda"))
    tokens = int(os.environ.get("TOKENS", "32768"))
    only = os.environ.get("LAYERS")
    names = [n for n in LAYERS if not only or any(n.startswith(o) for o in only.split(","))]
    rows = []
    for name in names:
        for T in [int(s) for s in os.environ.get("SEQS", "2048,8192").split(",")]:
            B = max(1, tokens // T)
            row = {"layer": name, "B": B, "T": T}
            try:
                row.update(measure(LAYERS[name], B, T))
            except Exception as e:  # noqa: BLE001  (a failing row is reported; the others still run)
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                traceback.print_exc(limit=3, file=sys.stdout)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    for r in rows:
        base = next((b for b in rows if b["layer"] == "gdn" and b["T"] == r["T"] and "fwdbwd_ms" in b), None)
        if base and "fwdbwd_ms" in r:
            r["ratio_to_gdn"] = round(r["fwdbwd_ms"] / base["fwdbwd_ms"], 2)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_mom.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("\n== table (bf16, hidden 2048, 4 heads x 256; ratio = fwd+bwd / our gdn at the same shape)")
    print(f"{'layer':22} {'shape':11} {'ms fwd':>9} {'ms fwd+bwd':>11} {'tokens/s':>12} {'peakGiB':>8} {'x gdn':>8}")
    for r in rows:
        shape = f"B{r['B']}xT{r['T']}"
        if "error" in r:
            print(f"{r['layer']:22} {shape:11} ERROR {r['error'][:80]}")
            continue
        print(f"{r['layer']:22} {shape:11} {r['fwd_ms']:9.2f} {r['fwdbwd_ms']:11.2f} {r['tok_s']:12.0f} "
              f"{r['peak_gib']:8.2f} {r.get('ratio_to_gdn', '-')!s:>8}")


if __name__ == "__main__":
    main()
