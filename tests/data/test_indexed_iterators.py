"""build_data_iterators on an indexed dataset: Megatron's GPTDataset through BlendedMegatronDatasetBuilder, with and
without torch.distributed, per-rank slices, resume, disjoint valid split and clear errors."""
import random

import pytest
import torch
import torch.distributed as dist

from linear_moe.config import Config, DataConfig, LoggingConfig, TrainConfig
from linear_moe.data import build_data_iterators, evaluate_batch, vocab_size_needed
from linear_moe.data.preprocess import preprocess

pytestmark = [pytest.mark.filterwarnings("ignore:Transformer Engine and Apex are not installed"),
              pytest.mark.filterwarnings("ignore:Could not determine rank")]

WORDS = ["alpha", "beta", "gamma", "δέλτα", "ε", "zeta\tz"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(42)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    (d / "c.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    preprocess([d / "c.txt"], d / "c", append_eod=True, log_every_s=None)
    return str(d / "c")


def _cfg(path, run_dir, *, t=63, mbs=2, gbs=8, steps=6, split="90,10,0", eval_interval=3) -> Config:
    return Config(data=DataConfig(kind="indexed", path=path, split=split),
                  train=TrainConfig(seq_length=t, micro_batch_size=mbs, global_batch_size=gbs, steps=steps,
                                    eval_interval=eval_interval, eval_steps=2),
                  logging=LoggingConfig(dir=str(run_dir)))


def _steps(cfg, dp_size, steps, consumed=0, which=0) -> list[dict[int, torch.Tensor]]:
    """Per step, {global sample index: tokens} from every rank (MegatronPretrainingSampler order)."""
    t = cfg.train
    n_micro = t.global_batch_size // (t.micro_batch_size * dp_size)
    its = [build_data_iterators(cfg, dp_rank=r, dp_size=dp_size, consumed_samples=consumed)[which]
           for r in range(dp_size)]
    out = []
    for s in range(steps):
        got = {}
        for j in range(n_micro):
            for r, it in enumerate(its):
                b = next(it)
                for i in range(t.micro_batch_size):
                    g = (consumed + s * t.global_batch_size + j * t.micro_batch_size * dp_size
                         + r * t.micro_batch_size + i)
                    got[g] = b["tokens"][i]
        out.append(got)
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[g], y[g]) for g in x)
                                    for x, y in zip(a, b))


def test_batches(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run", t=63, mbs=3, gbs=6)
    assert vocab_size_needed(cfg) == 257
    train, valid = build_data_iterators(cfg, dp_rank=0, dp_size=1)
    for it in (train, valid):
        for _ in range(3):
            b = next(it)
            assert set(b) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert all(x.shape == (3, 63) for x in b.values())
            assert b["tokens"].dtype == b["labels"].dtype == b["position_ids"].dtype == torch.int64
            assert b["loss_mask"].dtype == torch.float32 and bool((b["loss_mask"] == 1).all())
            # Megatron draws T + 1 tokens: labels are the next tokens.
            assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
            assert torch.equal(b["position_ids"], torch.arange(63).expand(3, 63))
            assert 0 <= b["tokens"].min() and b["tokens"].max() <= 256
    assert (tmp_path / "run" / "data_cache").is_dir()
    assert evaluate_batch(cfg, torch.randn(3, 63, 257), b) == {}


def test_rank_split_resume_and_wrap(corpus, tmp_path):
    # steps=2 builds 16 train samples; reading 6 steps wraps around the built epochs deterministically.
    cfg = _cfg(corpus, tmp_path / "run", steps=2)
    ref = _steps(cfg, 1, steps=6)
    assert _same(ref, _steps(cfg, 2, steps=6))
    assert _same(ref, _steps(cfg, 4, steps=6))
    assert _same(ref[4:], _steps(cfg, 2, steps=2, consumed=4 * cfg.train.global_batch_size))


def test_valid_split_is_disjoint(corpus, tmp_path):
    from linear_moe.data.indexed import build_indexed_datasets

    train, valid = build_indexed_datasets(_cfg(corpus, tmp_path / "run"), dp_size=1)
    # The documents each split's samples are drawn from.
    tr, va = set(train.dataset.document_index.tolist()), set(valid.dataset.document_index.tolist())
    assert tr and va and not tr & va
    assert tr | va == set(range(300))


def test_same_stream_with_torch_distributed(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run_plain")
    plain = _steps(cfg, 2, steps=3), _steps(cfg, 2, steps=2, which=1)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = _cfg(corpus, tmp_path / "run_dist")
        assert _same(plain[0], _steps(cfg, 2, steps=3))
        assert _same(plain[1], _steps(cfg, 2, steps=2, which=1))
    finally:
        dist.destroy_process_group()


def test_empty_valid_split(corpus, tmp_path):
    with pytest.raises(ValueError, match="gives the valid split no tokens"):
        build_data_iterators(_cfg(corpus, tmp_path / "run", split="100,0,0"), dp_rank=0, dp_size=1)
    # Evaluation off: training works, and only drawing from valid fails.
    train, valid = build_data_iterators(_cfg(corpus, tmp_path / "run", split="100,0,0", eval_interval=0),
                                        dp_rank=0, dp_size=1)
    assert next(train)["tokens"].shape == (2, 63)
    with pytest.raises(RuntimeError, match="no validation documents"):
        next(valid)


def test_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="linear_moe.data.preprocess"):
        build_data_iterators(_cfg(str(tmp_path / "nope"), tmp_path / "run"), dp_rank=0, dp_size=1)


def _rank_main(rank, corpus, tmp_path, steps):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=rank, world_size=2)
    try:
        cfg = _cfg(corpus, tmp_path / "run_2ranks")
        train, valid = build_data_iterators(cfg, dp_rank=rank, dp_size=2)
        torch.save({"train": [next(train) for _ in range(steps)], "valid": [next(valid) for _ in range(steps)]},
                   tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_build_with_barriers(corpus, tmp_path):
    """Two gloo ranks: rank 0 builds the index caches, rank 1 reads them; each gets its slice of each batch."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(corpus, tmp_path, 4), nprocs=2, start_method="fork")
    cfg = _cfg(corpus, tmp_path / "run_1rank")
    for which, key in ((0, "train"), (1, "valid")):
        its = [build_data_iterators(cfg, dp_rank=r, dp_size=2)[which] for r in range(2)]
        for r in range(2):
            got = torch.load(tmp_path / f"rank{r}.pt")[key]
            for b in got:
                want = next(its[r])
                assert all(torch.equal(b[k], want[k]) for k in want)
