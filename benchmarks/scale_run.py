"""Scaling runs: one config trained once per parallel layout, with the same seed, data and global batch, compared.

    python benchmarks/scale_run.py CONFIG.yaml [--layouts 1 tp2 cp2] [--steps N] [--seq-length S] [--global-batch G]
        [--micro-batch M] [--weak-scaling] [--timeout S] [--budget S] [--rtol R] [--out DIR] [key.path=value ...]

A layout is `1` (one process) or sizes joined together: `tp`, `pp`, `cp`, `dp`, `ep`, `vp` followed by a number, and
`sp` for sequence parallelism (switched on by itself for tp > 1 when the model has MoE layers, which need it), e.g.
`tp2`, `cp2dp4`, `tp2pp2dp2`, `tp2sp`. Processes = tp * pp * cp * dp. Each layout is one `torchrun --standalone`
of the pretrain entry (`python -m linear_moe.cli`, i.e. `linear-moe-pretrain`) on this node, with evaluation and
checkpoints off; its metrics.jsonl gives the per-step losses and the throughput (tokens/s per GPU, model TFLOP/s
per GPU and MFU as defined in `linear_moe.training.run_log.train_flops_per_token`, peak GiB over the ranks).

Data: unless `data.path=...` is given, a deterministic synthetic corpus (seeded Zipf-distributed words) is written
and tokenized with the repo's own preprocess path and the byte tokenizer, so no download is needed.

Compared: every layout with the reference's global batch against the reference, the first such layout that ran:
max |loss diff| over the common steps (and relative to the reference loss), and the mean diff over the last 10%.
Layouts whose ranks draw other initial weights (another pipeline size: each stage seeds its own stream; another
expert-parallel size with MoE layers) are shown but not held to --rtol. Speed figures are medians over the logged
intervals after the first 10% of steps (compilation and autotuning). Scaling efficiency is a layout's tokens/s per
GPU over that of the first one-process layout. `--weak-scaling` gives every layout global batch
G * processes / max processes (the same sequences per GPU per step); layouts with a global batch other than the
reference's are measured but not loss-compared.

A failing layout (config error, crash, --timeout, --budget spent) is reported and the others still run; the JSON
is rewritten after every layout. Writes scale_run.json, loss_curves.png (when matplotlib imports) and one directory
per layout (launch.log, metrics.jsonl) under --out (default $OUT, else runs/scale_run); prints one table last.
Exit status 0 when every layout ran and every same-weights comparison is within --rtol, else 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")

HERE = Path(__file__).resolve().parent
DEFAULT_LAYOUTS = ["dp8", "tp2dp4", "tp2pp2dp2", "cp2dp4"]
SIZE_KEYS = {"tp": "tensor", "pp": "pipeline", "cp": "context", "dp": "data", "ep": "expert", "vp": "virtual_pipeline"}
# A layout whose timeout would be shorter than this when --budget runs out is skipped instead.
MIN_LAYOUT_S = 30.0


@dataclass
class Layout:
    name: str
    sizes: dict[str, int]
    sequence_parallel: bool

    @property
    def world(self) -> int:
        s = self.sizes
        return s["tensor"] * s["pipeline"] * s["context"] * s["data"]


@dataclass
class Result:
    """One layout's run and what was read from its metrics.jsonl."""

    layout: str
    processes: int
    global_batch: int
    status: str = "not run"
    """'ok', 'config error', 'failed (rc N)', 'timeout', 'skipped (budget)' or 'no metrics'."""
    error: str = ""
    seconds: float = 0.0
    losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s_per_gpu: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    same_init: bool = True
    """Whether its ranks draw the reference's initial weights (same pipeline size, and expert size with MoE)."""
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    tail_diff: float | None = None
    loss_ok: bool | None = None
    scaling_efficiency: float | None = None


def parse_layout(text: str) -> Layout:
    """'1' or e.g. 'tp2pp2dp2', 'cp2dp4', 'tp2sp'; ValueError naming the layout otherwise."""
    sizes = {v: 1 for v in SIZE_KEYS.values()}
    sp = False
    if text != "1":
        rest = text
        while rest:
            if rest.startswith("sp"):
                sp, rest = True, rest[2:]
                continue
            m = re.match(r"(tp|pp|cp|dp|ep|vp)([1-9][0-9]*)", rest)
            if not m:
                raise ValueError(f"layout {text!r}: expected '1' or sizes like tp2, pp2, cp2, dp4, ep2, vp2 and 'sp' "
                                 f"joined together (e.g. tp2pp2dp2), stuck at {rest!r}")
            sizes[SIZE_KEYS[m.group(1)]] = int(m.group(2))
            rest = rest[m.end():]
    return Layout(text, sizes, sp)


def header() -> dict[str, str]:
    import torch

    # provenance.py sits beside this script, which the tests load by its path
    sys.path.insert(0, str(HERE))
    import provenance

    n = torch.cuda.device_count()
    return provenance.header(gpu=f"{n} x {torch.cuda.get_device_name()}" if n else "no GPU (CPU, gloo)")


def synthetic_corpus(prefix: Path, tokens: int, seed: int) -> Path:
    """A deterministic byte-tokenized corpus of about `tokens` tokens at `prefix`.bin/.idx: documents of words drawn
    from a fixed Zipf-distributed vocabulary of made-up words, tokenized by `linear_moe.data.preprocess`."""
    from linear_moe.data.preprocess import preprocess

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(4096)]
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    p /= p.sum()
    lines, total = [], 0
    while total < tokens:
        ids = rng.choice(len(words), size=int(rng.integers(100, 1500)), p=p)
        doc = " ".join(words[i] for i in ids)
        lines.append(doc)
        total += len(doc) + 1
    prefix.parent.mkdir(parents=True, exist_ok=True)
    text = prefix.with_suffix(".txt")
    text.write_text("\n".join(lines) + "\n")
    preprocess([text], prefix, tokenizer="byte", append_eod=True, log_every_s=None)
    text.unlink()
    return prefix


def layout_overrides(layout: Layout, args, *, global_batch: int, moe: bool, data_path: str, run_dir: Path) -> list[str]:
    s = layout.sizes
    sp = layout.sequence_parallel or (moe and s["tensor"] > 1)
    vp = s["virtual_pipeline"] if s["virtual_pipeline"] > 1 else "null"
    out = [f"parallel.tensor={s['tensor']}", f"parallel.pipeline={s['pipeline']}", f"parallel.context={s['context']}",
           f"parallel.expert={s['expert']}", f"parallel.virtual_pipeline={vp}",
           f"parallel.sequence_parallel={str(sp).lower()}", f"train.global_batch_size={global_batch}",
           f"train.log_interval={args.log_interval}", "train.eval_interval=0", f"logging.dir={run_dir}",
           "logging.progress=false", "logging.tensorboard=false", "logging.plot=false", "checkpoint.save=null",
           "checkpoint.load=null", "data.kind=indexed", f"data.path={data_path}"]
    for key, value in (("steps", args.steps), ("seq_length", args.seq_length), ("micro_batch_size", args.micro_batch)):
        if value is not None:
            out.append(f"train.{key}={value}")
    return out


def launch(cmd: list[str], run_dir: Path, timeout: float) -> tuple[str, str]:
    """Run one torchrun in its own process group, output to run_dir/launch.log: (status, error tail)."""
    log_path = run_dir / "launch.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as logf:
        proc = subprocess.Popen(cmd, cwd=run_dir, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return "timeout", f"no result after {timeout:.0f} s; killed"
    if rc == 0:
        return "ok", ""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    # The workers' own error lines, not torchrun's closing ChildFailedError report.
    errors = [ln for ln in lines if re.search(r"Error|error:|Exception", ln) and "ChildFailedError" not in ln
              and "torch.distributed.elastic" not in ln]
    return f"failed (rc {rc})", (errors[-1] if errors else lines[-1] if lines else "no output").strip()[-300:]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (torchrun and its workers), SIGKILL what is left after 15 s."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def read_metrics(res: Result, path: Path, steps: int) -> None:
    """Losses per step and the medians of the speed figures after the first 10% of steps, from metrics.jsonl."""
    if not path.is_file():
        return
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # the last line of a run killed while writing it
            continue
    train = [r for r in records if r.get("kind") == "train"]
    res.losses = {int(r["step"]): float(r["loss"]) for r in train}
    warm = max(1, steps // 10)
    timed = [r for r in train if r["step"] > warm] or train[-1:]

    def median(key: str) -> float | None:
        vals = [r[key] for r in timed if key in r]
        return statistics.median(vals) if vals else None

    res.tokens_per_s_per_gpu = median("tokens_per_s_per_gpu")
    res.tflops_per_gpu = median("tflops_per_gpu")
    res.mfu = median("mfu")
    peaks = [r["peak_mem_gib"] for r in train if "peak_mem_gib" in r]
    res.peak_mem_gib = max(peaks) if peaks else None


def compare(results: list[Result], ref: Result, rtol: float) -> None:
    """Loss diffs of every run layout with the reference's global batch, and the scaling efficiencies."""
    base = next((r for r in results if r.processes == 1 and r.tokens_per_s_per_gpu), None)
    for r in results:
        if base is not None and r.tokens_per_s_per_gpu:
            r.scaling_efficiency = r.tokens_per_s_per_gpu / base.tokens_per_s_per_gpu
        if r is ref or not r.losses or r.global_batch != ref.global_batch:
            continue
        steps = sorted(set(r.losses) & set(ref.losses))
        if not steps:
            continue
        diffs = [abs(r.losses[s] - ref.losses[s]) for s in steps]
        r.max_abs_diff = max(diffs)
        r.max_rel_diff = max(d / abs(ref.losses[s]) for d, s in zip(diffs, steps))
        tail = diffs[-max(1, len(diffs) // 10):]
        r.tail_diff = sum(tail) / len(tail)
        complete = len(steps) == len(ref.losses) and all(math.isfinite(d) for d in diffs)
        if r.same_init:
            r.loss_ok = complete and r.max_rel_diff <= rtol


def plot(results: list[Result], ref: Result | None, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for r in results:
        if not r.losses:
            continue
        steps = sorted(r.losses)
        top.plot(steps, [r.losses[s] for s in steps], label=f"{r.layout} (G={r.global_batch})")
        if ref is not None and r is not ref and r.global_batch == ref.global_batch:
            common = [s for s in steps if s in ref.losses]
            bottom.plot(common, [r.losses[s] - ref.losses[s] for s in common], label=r.layout)
    top.set_ylabel("train loss")
    if top.lines:
        top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel(f"loss minus layout {ref.layout}" if ref else "no reference")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    if bottom.lines:
        bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def table(results: list[Result], ref: Result | None, rtol: float) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [["layout", "GPUs", "G", "status", "max |dloss|", "rel", "last-10% dloss", f"within {rtol:g}",
             "tok/s/GPU", "TFLOP/s/GPU", "MFU", "peak GiB", "scaling eff"]]
    for r in results:
        if r is ref:
            agree = "reference"
        elif r.loss_ok is None:
            agree = "other init" if r.losses and not r.same_init and r.max_abs_diff is not None else "-"
        else:
            agree = "yes" if r.loss_ok else "NO"
        rows.append([r.layout, str(r.processes), str(r.global_batch), r.status, f(r.max_abs_diff, ".3g"),
                     f(r.max_rel_diff, ".2e"), f(r.tail_diff, ".3g"), agree, f(r.tokens_per_s_per_gpu, ",.0f"),
                     f(r.tflops_per_gpu, ".3g"), f(None if r.mfu is None else 100 * r.mfu, ".1f") +
                     ("%" if r.mfu is not None else ""), f(r.peak_mem_gib, ".1f"),
                     f(None if r.scaling_efficiency is None else 100 * r.scaling_efficiency, ".0f") +
                     ("%" if r.scaling_efficiency is not None else "")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config of the model and run")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides for every layout")
    p.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS, help=f"default: {' '.join(DEFAULT_LAYOUTS)}")
    p.add_argument("--steps", type=int, help="train.steps (default: the config's)")
    p.add_argument("--seq-length", type=int, help="train.seq_length (default: the config's)")
    p.add_argument("--global-batch", type=int, help="train.global_batch_size (default: the config's)")
    p.add_argument("--micro-batch", type=int, help="train.micro_batch_size (default: the config's)")
    p.add_argument("--weak-scaling", action="store_true",
                   help="global batch G * processes / max processes: the same sequences per GPU in every layout")
    p.add_argument("--log-interval", type=int, default=1, help="train.log_interval (default 1: a loss every step)")
    p.add_argument("--rtol", type=float, default=2e-2,
                   help="allowed max |loss diff| / reference loss for same-weights layouts (default 2e-2: bf16 runs "
                        "over hundreds of steps; fp32 CPU runs agree to ~1e-5)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per layout before it is killed")
    p.add_argument("--budget", type=float, help="seconds for all layouts; a layout's timeout is capped by what is left")
    p.add_argument("--corpus-tokens", type=int, default=16_000_000,
                   help="upper bound on the synthetic corpus size (it repeats as epochs when smaller than the run)")
    p.add_argument("--out", help="output directory (default: $OUT, else runs/scale_run)")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    from linear_moe.config import ConfigError, load_config
    from linear_moe.data import vocab_size_needed

    args = build_parser().parse_intermixed_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out or os.environ.get("OUT") or "runs/scale_run").resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = str(Path(args.config).resolve())
    try:
        layouts = [parse_layout(x) for x in args.layouts]
        base_overrides = list(args.overrides)
        for key, value in (("steps", args.steps), ("seq_length", args.seq_length),
                           ("global_batch_size", args.global_batch), ("micro_batch_size", args.micro_batch)):
            if value is not None:
                base_overrides.append(f"train.{key}={value}")
        user_data = any(o.startswith("data.path=") for o in args.overrides)
        if not user_data:
            base_overrides += ["data.kind=indexed", "data.tokenizer=byte", "data.path=synthetic"]
        base = load_config(config, base_overrides)
    except (ValueError, ConfigError) as e:
        print(f"scale_run: error: {e}", file=sys.stderr)
        return 2
    info = header()
    t = base.train
    moe = any(kind == "moe" for _, kind in base.model.layers())
    if base.model.vocab_size < vocab_size_needed(base):
        print(f"scale_run: error: model.vocab_size={base.model.vocab_size} is smaller than the data's "
              f"{vocab_size_needed(base)} ids", file=sys.stderr)
        return 2
    if user_data:
        data_path = base.data.path
    else:
        tokens = min(args.corpus_tokens, max(t.steps * t.global_batch_size * (t.seq_length + 1),
                                             64 * (t.seq_length + 1)))
        data_path = str(synthetic_corpus(out / "data" / "synthetic", tokens, t.seed))
    max_world = max(lay.world for lay in layouts)
    gpus = torch.cuda.device_count()
    print(f"config: {config}\nsteps {t.steps}, seq {t.seq_length}, global batch {t.global_batch_size}, "
          f"micro batch {t.micro_batch_size}, data {data_path}", flush=True)

    results: list[Result] = []
    ref: Result | None = None
    ref_layout: Layout | None = None
    summary = {"info": info, "config": config, "overrides": args.overrides, "steps": t.steps,
               "seq_length": t.seq_length, "global_batch": t.global_batch_size, "micro_batch": t.micro_batch_size,
               "weak_scaling": args.weak_scaling, "rtol": args.rtol, "data": data_path}

    def write_json() -> None:
        (out / "scale_run.json").write_text(json.dumps({**summary, "reference": ref.layout if ref else None,
                                                        "layouts": [asdict(r) for r in results]}, indent=1))

    for lay in layouts:
        gb = t.global_batch_size * lay.world // max_world if args.weak_scaling else t.global_batch_size
        res = Result(lay.name, lay.world, gb)
        results.append(res)
        run_dir = out / lay.name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        overrides = [*args.overrides, *layout_overrides(lay, args, global_batch=gb, moe=moe, data_path=data_path,
                                                         run_dir=run_dir)]
        if not user_data:
            overrides.append("data.tokenizer=byte")
        try:
            if gpus and lay.world > gpus:
                raise ConfigError(f"layout {lay.name} needs {lay.world} GPUs; this node has {gpus}")
            if args.weak_scaling and t.global_batch_size * lay.world % max_world:
                raise ConfigError(f"--weak-scaling: global batch {t.global_batch_size} * {lay.world} processes is "
                                  f"not divisible by {max_world}")
            cfg = load_config(config, overrides)
            cfg.validate(world_size=lay.world)
        except ConfigError as e:
            res.status, res.error = "config error", str(e)
            print(f"[{lay.name}] config error: {e}", flush=True)
            write_json()
            continue
        timeout = args.timeout
        if args.budget is not None:
            timeout = min(timeout, args.budget - (time.perf_counter() - t_start))
            if timeout < MIN_LAYOUT_S:
                res.status = "skipped (budget)"
                print(f"[{lay.name}] skipped: --budget {args.budget:.0f} s spent", flush=True)
                write_json()
                continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={lay.world}",
               "-m", "linear_moe.cli", config, *overrides]
        (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
        t0 = time.perf_counter()
        res.status, res.error = launch(cmd, run_dir, timeout)
        res.seconds = time.perf_counter() - t0
        read_metrics(res, run_dir / "metrics.jsonl", cfg.train.steps)
        if res.status == "ok" and not res.losses:
            res.status = "no metrics"
        res.same_init = ref_layout is None or (lay.sizes["pipeline"] == ref_layout.sizes["pipeline"] and
                                               (not moe or lay.sizes["expert"] == ref_layout.sizes["expert"]))
        if ref is None and res.status == "ok" and gb == t.global_batch_size:
            ref, ref_layout = res, lay
        print(f"[{lay.name}] {lay.world} processes, global batch {gb}: {res.status} in {res.seconds:.0f} s"
              + (f" ({res.error})" if res.error else ""), flush=True)
        write_json()

    if ref is not None:
        compare(results, ref, args.rtol)
    write_json()
    plotted = plot(results, ref, out / "loss_curves.png")
    print(f"\nwrote {out / 'scale_run.json'}" + (f", {out / 'loss_curves.png'}" if plotted else ""))
    print(f"loss reference: {ref.layout if ref else 'none (no layout with the common global batch ran)'}; "
          "scaling eff = tokens/s per GPU / the first one-process layout's; MFU = model FLOPs/s / peak bf16 FLOP/s")
    print(table(results, ref, args.rtol), flush=True)
    ok = ref is not None and all(r.status == "ok" for r in results) and all(r.loss_ok is not False for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
