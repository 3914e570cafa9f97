"""Constant-memory generation from a pretrain checkpoint: `linear-moe-generate --load DIR [--prompt TEXT | --ids 1,2,3]`.

Decoding runs the stock GPTModel with Megatron's `StaticInferenceContext`: softmax-attention layers keep their KV
cache there, and every recurrent mixer keeps its conv and recurrent state there (modules/inference.py), constant in
the context length. A batch of prompts of different lengths is left-padded: the context's `pad_mask` makes pad tokens
no-ops in the recurrent layers and `attention_mask` hides pad keys from attention (RoPE is relative, so left padding
keeps attention exact). Prefill runs the chunked kernels; each new token is one fused recurrent step per layer.

`--mqar N` checks recall through generation: for every query of N validation samples of the checkpoint's MQAR task,
the prompt is the sample up to the query and the greedy next token must be the value.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch

warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")

Tensor = torch.Tensor
PROG = "linear-moe-generate"


def attention_mask(key_pad: Tensor, num_queries: int) -> Tensor:
    """Megatron's boolean attention mask (True = masked) `[b, 1, q, k]` for the last `num_queries` of the k tokens
    of each sequence: causal, and pad keys `key_pad` `[b, k]` hidden."""
    L = key_pad.shape[1]
    q = torch.arange(L - num_queries, L, device=key_pad.device)
    causal = torch.arange(L, device=key_pad.device)[None, :] > q[:, None]  # [q, k]
    return (causal[None] | key_pad[:, None, :])[:, None]


def new_context(batch: int, max_len: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(batch, max_len)


@torch.no_grad()
def cached_forward(model, ctx, tokens: Tensor, key_pad: Tensor, pad: Tensor | None = None) -> Tensor:
    """One cached forward of `tokens` `[b, s]` at the context's sequence offset; returns logits `[b, s, V]` and
    advances the offset. key_pad `[b, offset + s]`: pad positions of everything seen so far; pad `[b, s]` the pads
    among these tokens (prefill only)."""
    T = tokens.shape[1]
    off = ctx.sequence_len_offset
    npad = key_pad.sum(1, keepdim=True)
    # positions count from each sequence's first real token (matters only for absolute position embeddings)
    pos = (torch.arange(off, off + T, device=tokens.device)[None] - npad).clamp(min=0)
    ctx.pad_mask = pad
    if off > 0:
        ctx.enable_decode_mode()
    logits = model(tokens, pos, attention_mask(key_pad, T), inference_context=ctx)
    ctx.pad_mask = None
    ctx.sequence_len_offset += T
    return logits


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Prompts -> (tokens `[b, L]` left-padded with id 0, pad mask `[b, L]`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    L = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), L, dtype=torch.long)
    pad = torch.ones(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p)
        pad[i, L - len(p):] = False
    return tokens.to(device), pad.to(device)


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next tokens `[b]` from logits `[b, V]`: greedy at temperature 0, else temperature and nucleus (top-p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, idx = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sp.cumsum(-1) - sp >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sp.masked_fill(drop, 0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class Generation:
    tokens: list[list[int]]
    """New tokens per prompt (up to and including a stop token)."""
    prompt_logits: Tensor
    """Logits of each prompt's last token `[b, V]` (real vocabulary)."""
    prefill_s: float
    decode_s: float
    decode_tokens: int


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, vocab_size: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_id: int | None = None, seed: int = 0) -> Generation:
    """Batched generation with left padding; model: an unwrapped GPTModel in eval mode."""
    device = next(model.parameters()).device
    tokens, pad = left_pad(prompts, device)
    B, L = tokens.shape
    ctx = new_context(B, L + max(max_new_tokens, 1))
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    logits = cached_forward(model, ctx, tokens, pad, pad)[:, -1, :vocab_size]
    sync()
    t1 = time.perf_counter()
    prompt_logits, key_pad = logits, pad
    out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p, gen)
        out.append(nxt)
        if stop_id is not None:
            done |= nxt == stop_id
            if bool(done.all()):
                break
        if step + 1 == max_new_tokens:
            break
        key_pad = torch.cat([key_pad, key_pad.new_zeros(B, 1)], 1)
        logits = cached_forward(model, ctx, nxt[:, None], key_pad)[:, -1, :vocab_size]
    sync()
    t2 = time.perf_counter()
    new = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
    if stop_id is not None:
        new = [row[:row.index(stop_id) + 1] if stop_id in row else row for row in new]
    return Generation(new, prompt_logits, t1 - t0, t2 - t1, B * max(len(out) - 1, 0))


class UsageError(Exception):
    """Bad command-line input; the message names the flag."""


def read_checkpoint(load_dir: str):
    """(config for world size 1, checkpoint path) of the latest checkpoint under `load_dir`; nothing initialised."""
    from linear_moe.config import Config, ConfigError, ParallelConfig, from_dict
    from linear_moe.training import checkpoint

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise UsageError(f"{PROG} runs in one process (tensor parallel 1); got WORLD_SIZE={world}: run it without "
                         "torchrun")
    try:
        path = checkpoint.find_latest(load_dir)
    except ConfigError as e:
        detail = str(e).split(": ", 1)[-1].split(";")[0]
        raise UsageError(f"--load {load_dir!r}: {detail}; pass the checkpoint.save directory of a pretrain run") \
            from None
    try:
        cfg = from_dict(Config, checkpoint.saved_config(path))
    except (KeyError, ConfigError) as e:
        raise UsageError(f"--load {load_dir!r}: {path} holds no valid saved config ({e})") from None
    # the saved tensors reshard, so a checkpoint of any TP/PP layout loads at world size 1
    cfg.parallel = ParallelConfig()
    cfg.checkpoint.load = cfg.checkpoint.save = None
    return cfg, path


def load_model(cfg, path):
    """The GPTModel of `cfg` with the weights of checkpoint `path`, in eval mode (after `training.initialize`)."""
    from linear_moe.model import build_model, transformer_config
    from linear_moe.training import checkpoint

    model = build_model(cfg, transformer_config(cfg))
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    checkpoint.load_model(path, model)
    return model.eval()


def mqar_eval(cfg, model, num_samples: int, batch_size: int) -> tuple[float, float, int]:
    """(accuracy through generation, teacher-forced forward accuracy, queries) on `num_samples` validation samples."""
    from linear_moe.data.mqar import MQARDataset

    ds = MQARDataset(cfg.data.mqar, cfg.train.seq_length, cfg.train.seed, stream=1)
    device = next(model.parameters()).device
    prompts, answers, fwd_hits = [], [], 0
    for i in range(num_samples):
        s = ds[i]
        tok, lab = s["tokens"], s["labels"]
        qs = s["loss_mask"].nonzero()[:, 0].tolist()
        prompts += [tok[:q + 1].tolist() for q in qs]
        answers += [int(lab[q]) for q in qs]
        with torch.no_grad():
            logits = model(tok[None].to(device), s["position_ids"][None].to(device), None)
        fwd_hits += int((logits[0, qs, :cfg.model.vocab_size].argmax(-1).cpu() == lab[qs]).sum())
    hits = 0
    for j in range(0, len(prompts), batch_size):
        g = generate(model, prompts[j:j + batch_size], 1, vocab_size=cfg.model.vocab_size)
        hits += sum(int(row[0] == a) for row, a in zip(g.tokens, answers[j:j + batch_size]))
    n = max(len(answers), 1)
    return hits / n, fwd_hits / n, len(answers)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Generate from a linear-moe pretrain checkpoint (world size 1).")
    p.add_argument("--load", required=True, metavar="DIR", help="checkpoint directory (checkpoint.save of a run)")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    p.add_argument("--ids", action="append", default=[], metavar="1,2,3", help="a prompt as token ids (repeatable)")
    p.add_argument("--tokenizer", default=None,
                   help="'byte' or a tokenizer.json path; default: the checkpoint's data.tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mqar", type=int, default=0, metavar="N", help="MQAR recall on N validation samples")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per batch for --mqar")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: single-token steps are too small to gain from intra-op threads, "
                        "and on a busy machine extra threads make them many times slower); ignored on GPU")
    return p


def _prompts(args, tokenizer) -> list[list[int]]:
    out = []
    for text in args.prompt:
        ids = tokenizer.tokenize(text)
        if not ids:
            raise UsageError(f"--prompt {text!r} has no tokens")
        out.append(ids)
    for spec in args.ids:
        try:
            ids = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--ids {spec!r}: expected comma-separated integers like 1,2,3") from None
        if not ids:
            raise UsageError(f"--ids {spec!r} has no tokens")
        out.append(ids)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 0 or not 0 < args.top_p <= 1 or args.temperature < 0 or args.mqar < 0:
        print(f"{PROG}: error: --max-new-tokens, --temperature, --mqar must be >= 0 and --top-p in (0, 1]",
              file=sys.stderr)
        return 2
    if not (args.prompt or args.ids or args.mqar):
        print(f"{PROG}: error: give --prompt TEXT, --ids 1,2,3 or --mqar N", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"{PROG}: error: --threads must be >= 1", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    created = None
    try:
        cfg, path = read_checkpoint(args.load)
        from linear_moe.training import initialize

        created = initialize(cfg)
        model = load_model(cfg, path)
        from linear_moe.data.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(args.tokenizer or cfg.data.tokenizer)
        prompts = _prompts(args, tokenizer)
        V = cfg.model.vocab_size
        if any(t < 0 or t >= V for p in prompts for t in p):
            raise UsageError(f"prompt token ids must lie in [0, model.vocab_size={V})")
        dev = next(model.parameters()).device
        print(f"# {PROG}: {cfg.model.layer_pattern!r}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"params on {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}")
        if prompts:
            stop = getattr(tokenizer, "eod", None)
            g = generate(model, prompts, args.max_new_tokens, vocab_size=V, temperature=args.temperature,
                         top_p=args.top_p, stop_id=stop if stop is not None and stop < V else None, seed=args.seed)
            for p, new in zip(prompts, g.tokens):
                print(f"--- prompt ({len(p)} tokens): {tokenizer.detokenize(p)!r}\n{tokenizer.detokenize(new)!r}\nids: {new}")
            rate = g.decode_tokens / g.decode_s if g.decode_s > 0 else float("nan")
            print(f"prefill {sum(map(len, prompts))} tokens in {g.prefill_s * 1e3:.1f} ms; decode {g.decode_tokens} "
                  f"tokens in {g.decode_s * 1e3:.1f} ms: {rate:.1f} tokens/s (batch {len(prompts)})")
        if args.mqar:
            if cfg.data.kind != "mqar":
                raise UsageError(f"--mqar needs a checkpoint trained on data.kind=mqar, got {cfg.data.kind!r}")
            acc, fwd, n = mqar_eval(cfg, model, args.mqar, args.batch_size)
            print(f"MQAR accuracy through generation: {acc:.4f} on {n} queries of {args.mqar} samples "
                  f"(teacher-forced forward: {fwd:.4f})")
    except (UsageError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if created is not None:
            from linear_moe.training import shutdown

            shutdown(created)
    return 0
