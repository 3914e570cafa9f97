"""Rank-0 run outputs: a log line every log interval, a tqdm bar, tensorboard scalars, metrics.jsonl, loss.png; and
the throughput figures those records carry (tokens/s per GPU, model FLOPs and MFU, peak GPU memory)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("linear_moe.train")

# Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOP/s, from the vendors' data sheets; the first name
# contained in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0))
# Time steps per chunk of the chunked linear-recurrence kernels (kernels/gla, kernels/delta_rule).
CHUNK = 64


class RunLog:
    """Writes everything a run reports; a no-op object on ranks other than 0."""

    def __init__(self, cfg, *, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.dir = Path(cfg.logging.dir)
        self.cfg = cfg.logging
        self.history: list[dict] = []
        self.writer = None
        self.bar = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps a resumed run's earlier records next to the new ones.
        self.jsonl = (self.dir / "metrics.jsonl").open("a")
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        if self.cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, record: dict, *, kind: str = "train") -> None:
        """Log one record (`step` plus float metrics): log line, jsonl, tensorboard under `kind/`."""
        if not self.enabled:
            return
        record = {"kind": kind, **record}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)
        line = f"[{kind}] step {step}" + "".join(
            f" | {k} {_fmt(v)}" for k, v in record.items() if k not in ("kind", "step"))
        if self.bar is not None:
            self.bar.write(line)
            if kind == "train" and "loss" in record:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        else:
            log.info(line)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()
        if self.cfg.plot:
            self._plot()

    def _plot(self) -> None:
        """loss.png: train and eval loss over steps (this run's records)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, key in (("train", "loss"), ("eval", "loss")):
            pts = [(r["step"], r[key]) for r in self.history if r["kind"] == kind and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if kind == "eval" else None, label=f"{kind} loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.dir / "loss.png", dpi=100)
        plt.close(fig)


def train_flops_per_token(cfg) -> float | None:
    """Model FLOPs of one trained token: 3x the forward (backward = 2x forward; no activation recompute); None when
    the pattern holds a mixer that is neither attention nor linear-recurrent (no `op`), whose work is not known here.

    Forward FLOPs per token, 2 per multiply-add; h = model.hidden_size, s = train.seq_length, V = the padded
    vocabulary, C = CHUNK, per layer of the pattern:

    - softmax attention (n heads of d = h / n, g query groups): 2·h·d·(n + 2g) for q, k, v; 2·n·d·h for the output
      projection; 2·n·d·s for causal scores and weighted values (position i attends to i + 1 keys, s / 2 on average,
      2·n·d·(s/2) each for QKᵀ and AV).
    - linear mixer (H heads, key dim K, value dim V'; mamba2's C, B, x read as q, k, v per head): 2·h·H·(2K + V')
      for q, k, v, 2·h·H·V' for the output gate when on, 2·H·V'·h for o_proj, plus the chunked recurrence per head:
      GLA family (gla, retention, linear attention, mamba2) 4·K·V' + 2·C·(K + V') (state read and update,
      intra-chunk QKᵀ and AV); delta-rule family (deltanet, gated DeltaNet) 6·K·V' + 2·C·(3K + 2V') + (2/3)·C² (adds
      the state read of the delta correction, the chunk's KKᵀ, the WY products with K and V and the triangular
      solve). Intra-chunk products are counted as full C x C blocks, as the kernels compute them.
    - MoM: the router 2·h·M, q and the output gate as above, then for each of the topk + shared memories a token
      uses: k and v projections 2·h·H·(K + V') and the recurrence of its memory kind; o_proj once. Like MoE MFU this
      counts the routed work only: the implementation projects k and v of all M (+1) memories for every token (one
      dense GEMM, no grouped GEMM), which is hardware work beyond the model's FLOPs.
    - FFN: dense 2·h·f·(3 if gated else 2); MoE 2·h·E for the router, topk experts of 2·h·f_e·(3 | 2) each and the
      shared expert if any.
    - output logits 2·h·V once (the embedding lookup is free).

    Small per-head projections (beta, decay gates, GLA's low-rank gate), the short conv, norms, activations and the
    losses are elementwise or O(h) and not counted.
    """
    from linear_moe.model import padded_vocab_size
    from linear_moe.registry import get_mixer

    m, s = cfg.model, cfg.train.seq_length
    h = m.hidden_size
    glu = 3 if m.gated_mlp else 2

    def recurrence(op: str, K: int, V: int) -> float:
        if op == "delta_rule":
            return 6 * K * V + 2 * CHUNK * (3 * K + 2 * V) + 2 * CHUNK ** 2 / 3
        return 4 * K * V + 2 * CHUNK * (K + V)

    def mixer(name: str) -> float | None:
        if name == "attention":
            n = m.num_attention_heads
            g, d = m.num_query_groups or n, h // n
            return 2 * h * d * (n + 2 * g) + 2 * n * d * h + 2 * n * d * s
        mc = m.mixer_config(name)
        H, K, V = mc.num_heads, mc.head_dim, mc.value_dim
        shared = 2 * H * V * h + (2 * h * H * V if mc.use_output_gate else 0)
        if name == "mom":
            op = "delta_rule" if mc.memory_kind == "gated_delta" else "gla"
            used = mc.topk + int(mc.shared_memory)
            return (2 * h * mc.num_memories + 2 * h * H * K + shared
                    + used * (2 * h * H * (K + V) + H * recurrence(op, K, V)))
        op = getattr(get_mixer(name), "op", None)
        if op is None:
            return None
        return 2 * h * H * (2 * K + V) + shared + H * recurrence(op, K, V)

    def ffn(kind: str) -> float:
        if kind == "dense":
            return 2 * h * (m.ffn_hidden_size or 4 * h) * glu
        if kind == "moe":
            e = m.moe
            f_e = e.ffn_hidden_size or m.ffn_hidden_size or 4 * h
            return 2 * h * e.num_experts + e.topk * 2 * h * f_e * glu + 2 * h * (e.shared_expert_size or 0) * glu
        return 0.0

    layers = [(mixer(name), ffn(kind)) for name, kind in m.layers()]
    if any(mix is None for mix, _ in layers):
        return None
    return 3.0 * (sum(mix + f for mix, f in layers) + 2 * h * padded_vocab_size(cfg))


def peak_flops_per_gpu(cfg) -> float | None:
    """Peak dense bf16 FLOP/s of one GPU: logging.peak_tflops, else looked up by device name; None on CPU or an
    unknown card (then no MFU is logged)."""
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in name), None)


class Throughput:
    """Per-interval speed figures of a run: tokens/s (all GPUs and per GPU), model TFLOP/s per GPU and MFU (these two
    only where train_flops_per_token knows every mixer, MFU only where the peak is known)."""

    def __init__(self, cfg, world_size: int):
        self.world = world_size
        self.flops_per_token = train_flops_per_token(cfg)
        self.peak = peak_flops_per_gpu(cfg)

    def metrics(self, tokens: int, seconds: float) -> dict[str, float]:
        tps = tokens / seconds
        out = {"tokens_per_s": tps, "tokens_per_s_per_gpu": tps / self.world}
        if self.flops_per_token is not None:
            out["tflops_per_gpu"] = tps * self.flops_per_token / self.world / 1e12
            if self.peak:
                out["mfu"] = tps * self.flops_per_token / (self.world * self.peak)
        return out


def peak_memory_gib() -> float | None:
    """The largest torch.cuda.max_memory_allocated over all ranks, in GiB; None on CPU. A collective on GPU: every
    rank calls it."""
    if not torch.cuda.is_available() or not dist.is_initialized():
        return None
    peak = torch.tensor([float(torch.cuda.max_memory_allocated())], device=torch.cuda.current_device())
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak) / 2 ** 30


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)
