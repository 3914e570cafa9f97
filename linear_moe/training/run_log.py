"""Rank-0 run outputs: a log line every log interval, a tqdm bar, tensorboard scalars, metrics.jsonl, loss.png."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("linear_moe.train")


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


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)
