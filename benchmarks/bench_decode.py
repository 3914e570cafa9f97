"""Decode step latency and state memory: MoM vs Gated DeltaNet vs softmax attention, same width and depth.

Each model is a stock GPTModel from our block spec (dense SwiGLU FFN, ratio 3), decoding through Megatron's
StaticInferenceContext exactly as `linear-moe-generate` does. The step cost of a recurrent model does not depend on
how its state was made, so its state (conv + recurrent, constant in the context) is built directly; the attention
model gets a KV cache of the context length. One step = one token per sequence through the whole model, timed with
CUDA events after warmup. "state MiB" is the decoding state of all layers (attention: the KV cache at that context).
Cells whose KV cache would not fit are reported as skipped.

Run: python benchmarks/bench_decode.py  [CONTEXTS=1024,8192,32768,131072] [BATCHES=1,64] [NUM_LAYERS=4] [HIDDEN=1024]
(JSON rows in $OUT/bench_decode.json when OUT is set; on CPU it runs a tiny smoke version.)
"""
from __future__ import annotations

import json
import os
import time
import warnings

import provenance
import torch

warnings.filterwarnings("ignore")
GPU = torch.cuda.is_available()
CONTEXTS = [int(x) for x in os.environ.get("CONTEXTS", "1024,8192,32768,131072" if GPU else "64,256").split(",")]
BATCHES = [int(x) for x in os.environ.get("BATCHES", "1,64" if GPU else "1,4").split(",")]
NUM_LAYERS = int(os.environ.get("NUM_LAYERS", "4" if GPU else "2"))
HIDDEN = int(os.environ.get("HIDDEN", "1024" if GPU else "64"))
HEADS = 4  # linear mixers: 4 heads x HIDDEN/4 (FIELD.md's MoM reference shape); attention: HIDDEN/128 heads x 128
WARMUP, ITERS = (3, 20) if GPU else (1, 3)
# room left for weights and activations when sizing the KV cache
KV_BUDGET = (torch.cuda.get_device_properties(0).total_memory * 0.8 if GPU else 2 * 2**30)

MODELS = {
    "mom": ("X-", ["model.mixers.mom.num_memories=4", "model.mixers.mom.topk=2", "model.mixers.mom.shared_memory=true",
                   f"model.mixers.mom.num_heads={HEADS}", "model.position_embedding=none"]),
    "gated_deltanet": ("D-", [f"model.mixers.gated_deltanet.num_heads={HEADS}", "model.position_embedding=none"]),
    "attention": ("*-", [f"model.num_attention_heads={max(HIDDEN // 128, 1)}", "model.position_embedding=rope"]),
}


def header() -> None:
    provenance.header(gpu=None if GPU else "no GPU (CPU smoke run)")


def build(name: str):
    from linear_moe.config import load_config
    from linear_moe.model import build_model, transformer_config

    sym, extra = MODELS[name]
    cfg = load_config(None, [
        f"model.hidden_size={HIDDEN}", f"model.num_layers={NUM_LAYERS}", f"model.layer_pattern={sym * NUM_LAYERS}",
        f"model.ffn_hidden_size={3 * HIDDEN}", "model.vocab_size=32000" if GPU else "model.vocab_size=256",
        "model.num_attention_heads=4", "train.precision=bf16", "train.seq_length=2048", "data.mqar.num_keys=16",
        "data.mqar.num_values=16", *extra])
    model = build_model(cfg, transformer_config(cfg))
    if GPU:
        model.cuda()
    return cfg, model.eval()


def dtype_of(model) -> torch.dtype:
    return next(model.parameters()).dtype


def make_state(model, batch: int, context: int):
    """A StaticInferenceContext positioned after `context` tokens, with every layer's state built directly."""
    from megatron.core.inference.contexts import StaticInferenceContext

    ctx = StaticInferenceContext(batch, context + 1)
    dev, dt = next(model.parameters()).device, dtype_of(model)
    for layer in model.decoder.layers:
        mixer = layer.self_attention
        if hasattr(mixer, "state_specs"):
            # recurrent: states of a plausible scale; the step reads and writes them whatever their values
            ctx.key_value_memory_dict[mixer.layer_number] = tuple(
                torch.randn(batch, *shape, dtype=d, device=dev) * 0.1 for shape, d in mixer.state_specs(dt))
        else:
            ctx.key_value_memory_dict[mixer.layer_number] = (
                mixer._allocate_memory(context + 1, batch, mixer.key_hidden_size, dt).normal_(),
                mixer._allocate_memory(context + 1, batch, mixer.val_hidden_size, dt).normal_())
    ctx.sequence_len_offset = context
    ctx.enable_decode_mode()
    return ctx


def state_bytes(ctx) -> int:
    return sum(t.numel() * t.element_size() for ts in ctx.key_value_memory_dict.values() for t in ts)


def kv_bytes(cfg, batch: int, context: int) -> int:
    groups = cfg.model.num_query_groups or cfg.model.num_attention_heads
    return 2 * NUM_LAYERS * (context + 1) * batch * groups * (HIDDEN // cfg.model.num_attention_heads) * 2


@torch.no_grad()
def time_step(model, ctx, batch: int) -> float:
    """ms per decode step (one token per sequence); the offset stays put, so every step reads the same context."""
    dev = next(model.parameters()).device
    tok = torch.randint(0, 256, (batch, 1), device=dev)
    pos = torch.full((batch, 1), ctx.sequence_len_offset, device=dev)

    def step():
        return model(tok, pos, None, inference_context=ctx)

    for _ in range(WARMUP):
        step()
    if GPU:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(ITERS):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / ITERS
    t = time.perf_counter()
    for _ in range(ITERS):
        step()
    return (time.perf_counter() - t) * 1e3 / ITERS


def main() -> None:
    header()
    from linear_moe.config import load_config
    from linear_moe.training import initialize, shutdown

    t0 = time.perf_counter()
    created = initialize(load_config(None, ["data.mqar.num_keys=16", "data.mqar.num_values=16"]))
    rows = []
    for name in MODELS:
        cfg, model = build(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for batch in BATCHES:
            for context in CONTEXTS:
                row = {"model": name, "params_M": round(params, 1), "batch": batch, "context": context}
                if name == "attention" and kv_bytes(cfg, batch, context) > KV_BUDGET:
                    row.update(skipped=f"KV cache {kv_bytes(cfg, batch, context) / 2**30:.0f} GiB does not fit")
                else:
                    ctx = make_state(model, batch, context)
                    try:
                        ms = time_step(model, ctx, batch)
                        row.update(ms_per_token=ms, tokens_per_s=batch * 1e3 / ms, state_mib=state_bytes(ctx) / 2**20)
                    except torch.OutOfMemoryError:
                        row.update(skipped="out of memory")
                    del ctx
                    if GPU:
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model
        if GPU:
            torch.cuda.empty_cache()
    shutdown(created)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_decode.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name() if GPU else "cpu", "layers": NUM_LAYERS, "hidden": HIDDEN,
                       "rows": rows}, f, indent=1)
    print(f"\n# decode step, {NUM_LAYERS} layers, hidden {HIDDEN}, {'bf16' if GPU else 'fp32 CPU'}; "
          f"params M: " + ", ".join(f"{n} {next(r['params_M'] for r in rows if r['model'] == n)}" for n in MODELS)
          + f"; ran {time.perf_counter() - t0:.0f} s")
    by = {(r["model"], r["batch"], r["context"]): r for r in rows}
    cols = "".join(f" | {n} ms/tok | {n} MiB" for n in MODELS)
    def ratio(num, den) -> str:
        return f"{num['ms_per_token'] / den['ms_per_token']:.2f}" if "ms_per_token" in num and \
            "ms_per_token" in den else "-"

    # issue #5's targets: MoM's step within 1.5x gated DeltaNet's, and flat in the context (vs the shortest one)
    print(f"| batch | context{cols} | mom / gdn | mom / mom at {CONTEXTS[0]} | mom / attn |")
    print("|---|---" + "|---|---" * len(MODELS) + "|---|---|---|")
    for batch in BATCHES:
        for context in CONTEXTS:
            cells = ""
            for n in MODELS:
                r = by[(n, batch, context)]
                cells += (f" | {r['ms_per_token']:.3f} | {r['state_mib']:.2f}" if "ms_per_token" in r
                          else " | skip | skip")
            m = by[("mom", batch, context)]
            print(f"| {batch} | {context}{cells} | {ratio(m, by[('gated_deltanet', batch, context)])} | "
                  f"{ratio(m, by[('mom', batch, CONTEXTS[0])])} | {ratio(m, by[('attention', batch, context)])} |")


if __name__ == "__main__":
    main()
