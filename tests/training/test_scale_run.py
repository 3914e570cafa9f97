"""benchmarks/scale_run.py end to end on CPU (gloo): a tiny MoM recipe trained as one process and as TP2 (two
torchrun processes) on the runner's synthetic indexed data agrees loss for loss; throughput is read back from the
runs' metrics.jsonl; a layout with a config error, and one past its timeout, are reported while the others run."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from linear_moe.config import load_config
from linear_moe.training.run_log import train_flops_per_token

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "mom_340m.yaml"
TINY = ["model.num_layers=2", "model.layer_pattern=X- X-", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.mixers.mom.head_dim=16", "model.vocab_size=512"]
SIZES = ["--steps", "3", "--seq-length", "64", "--global-batch", "4", "--micro-batch", "2"]
# fp32 on CPU: TP splits matmul sums in another order, round-off only (the parallel tests hold TP2 to 1e-5).
RTOL = 1e-4


def _runner():
    spec = importlib.util.spec_from_file_location("scale_run", ROOT / "benchmarks" / "scale_run.py")
    mod = importlib.util.module_from_spec(spec)
    # dataclasses resolve their module through sys.modules
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_one_process_and_tp2_agree_and_failures_are_reported(tmp_path, capsys):
    out = tmp_path / "out"
    # ep2 on one process: parallel.expert must divide the data * context * tensor sizes.
    code = _runner().main([str(CONFIG), "--layouts", "1", "tp2", "ep2", *SIZES, "--rtol", str(RTOL),
                           "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    assert code == 1, printed
    summary = json.loads((out / "scale_run.json").read_text())
    runs = {r["layout"]: r for r in summary["layouts"]}
    assert summary["reference"] == "1"
    assert runs["1"]["status"] == runs["tp2"]["status"] == "ok", runs
    assert runs["tp2"]["processes"] == 2 and runs["tp2"]["global_batch"] == 4
    assert sorted(map(int, runs["tp2"]["losses"])) == [1, 2, 3]
    assert runs["tp2"]["loss_ok"] is True and runs["tp2"]["max_rel_diff"] <= RTOL, runs["tp2"]
    for r in (runs["1"], runs["tp2"]):
        assert r["tokens_per_s_per_gpu"] > 0 and r["tflops_per_gpu"] > 0
    assert runs["1"]["scaling_efficiency"] == 1.0
    assert runs["ep2"]["status"] == "config error" and "parallel.expert" in runs["ep2"]["error"]
    record = json.loads((out / "tp2" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["tokens_per_s_per_gpu"] == pytest.approx(record["tokens_per_s"] / 2)
    cfg = load_config(CONFIG, [*TINY, "train.seq_length=64", "data.tokenizer=byte"])
    assert record["tflops_per_gpu"] == pytest.approx(
        record["tokens_per_s_per_gpu"] * train_flops_per_token(cfg) / 1e12)
    assert (out / "loss_curves.png").stat().st_size > 0
    table = printed[printed.index("layout |"):].splitlines()
    assert [row.split("|")[0].strip() for row in table[2:]] == ["1", "tp2", "ep2"]


def test_a_layout_past_its_timeout_is_killed_and_reported(tmp_path, capsys):
    out = tmp_path / "out"
    code = _runner().main([str(CONFIG), "--layouts", "1", *SIZES, "--timeout", "1", "--out", str(out), *TINY])
    capsys.readouterr()
    run = json.loads((out / "scale_run.json").read_text())["layouts"][0]
    assert code == 1 and run["status"] == "timeout" and run["losses"] == {}


def test_flops_per_token_count_the_routed_work():
    def flops(*overrides):
        return train_flops_per_token(load_config(CONFIG, [*TINY, "train.seq_length=64", "data.tokenizer=byte",
                                                          *overrides]))

    h, f, s, vocab, n = 64, 128, 64, 512, 4
    d = h // n
    # attention + SwiGLU MLP: every weight matmul 2 FLOPs per weight, causal scores and values 2·n·d·s, the logits
    per_layer = 2 * (h * 3 * n * d + n * d * h + 3 * h * f) + 2 * n * d * s
    assert flops("model.num_layers=1", "model.layer_pattern=*-") == pytest.approx(3 * (per_layer + 2 * h * vocab))
    # MoM: one more memory per token adds its k/v projections and recurrence; more memories at the same top-k only
    # widen the router
    base = flops()
    more_memories = flops("model.mixers.mom.num_memories=8")
    assert more_memories - base == pytest.approx(3 * 2 * (2 * h * 4))
    assert flops("model.mixers.mom.topk=3") - base > 100 * (more_memories - base)
