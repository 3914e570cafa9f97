"""`linear-moe-generate` end to end on a checkpoint written by a 2-step pretrain run, and its bad-input errors."""
from __future__ import annotations

import re

import pytest
from gen_helpers import TINY

from linear_moe.cli import generate_main, pretrain_main


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    ck = root / "ck"
    # byte prompts need ids up to 255
    rc = pretrain_main([*TINY, "model.vocab_size=256", "model.layer_pattern=X- *E", "model.num_layers=2",
                        "model.mixers.mom.head_dim=8", "train.seq_length=32", "train.steps=2", "train.eval_interval=0",
                        "optim.warmup_steps=1", f"logging.dir={root / 'run'}", f"checkpoint.save={ck}"])
    assert rc == 0
    return ck


def test_generate_ids_and_text(checkpoint_dir, capsys):
    assert generate_main(["--load", str(checkpoint_dir), "--ids", "1,2,3", "--ids", "4", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("ids: [") == 2 and "tokens/s" in out
    assert re.search(r"decode 8 tokens", out), out  # 2 prompts x 4 steps after the prefill's token
    assert generate_main(["--load", str(checkpoint_dir), "--prompt", "ab", "--temperature", "0.8", "--top-p", "0.9",
                          "--max-new-tokens", "3", "--tokenizer", "byte"]) == 0
    assert "prompt (2 tokens): 'ab'" in capsys.readouterr().out


def test_generate_mqar_recall_matches_forward(checkpoint_dir, capsys):
    assert generate_main(["--load", str(checkpoint_dir), "--mqar", "2", "--batch-size", "5"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"through generation: ([0-9.]+) on (\d+) queries .*forward: ([0-9.]+)", out)
    assert m, out
    # greedy next token of each left-padded prompt == argmax of the teacher-forced forward at the query
    assert m.group(1) == m.group(3) and int(m.group(2)) == 2 * 4


@pytest.mark.parametrize("args,flag", [
    (["--load", "{tmp}/missing", "--ids", "1"], "--load"),
    (["--load", "{tmp}", "--ids", "1"], "--load"),
    (["--load", "{ck}", "--ids", "1,x"], "--ids"),
    (["--load", "{ck}", "--ids", "999"], "vocab_size"),
])
def test_generate_bad_input_exits_2(args, flag, tmp_path, checkpoint_dir, capsys):
    args = [a.format(tmp=tmp_path, ck=checkpoint_dir) for a in args]
    assert generate_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("linear-moe-generate: error:") and flag in err, err
