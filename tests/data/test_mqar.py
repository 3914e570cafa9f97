"""MQAR: determinism by (seed, index), Megatron sampler semantics over ranks and resumes, task structure, metric."""
import pytest
import torch

from linear_moe.config import Config, DataConfig, MQARConfig, TrainConfig
from linear_moe.data import build_data_iterators, evaluate_batch, vocab_size_needed
from linear_moe.data.mqar import MQARDataset, mqar_accuracy

SHAPES = [  # (num_kv_pairs, num_keys, num_values, seq_length): odd T, the shortest T, every key used
    (4, 16, 16, 63),
    (8, 64, 64, 1000),
    (3, 8, 8, 12),
    (8, 8, 8, 64),
]


def _cfg(n=4, k=16, v=16, t=63, mbs=2, gbs=8, seed=42) -> Config:
    return Config(data=DataConfig(kind="mqar", mqar=MQARConfig(num_kv_pairs=n, num_keys=k, num_values=v)),
                  train=TrainConfig(seq_length=t, micro_batch_size=mbs, global_batch_size=gbs, seed=seed))


def _eq(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_index_same_sample():
    cfg = MQARConfig(num_kv_pairs=4, num_keys=16, num_values=16)
    a, b = MQARDataset(cfg, 63, seed=42), MQARDataset(cfg, 63, seed=42)
    # Out of order access must not matter: no generator state is shared between samples.
    for i in (0, 7, 3, 10**9):
        assert _eq(a[i], b[i])
    assert not torch.equal(a[0]["tokens"], a[1]["tokens"])
    assert not torch.equal(a[0]["tokens"], MQARDataset(cfg, 63, seed=43)[0]["tokens"])
    assert not torch.equal(a[0]["tokens"], MQARDataset(cfg, 63, seed=42, stream=1)[0]["tokens"])


def _stream(cfg: Config, dp_size: int, steps: int, consumed: int = 0, which: int = 0) -> list[list[torch.Tensor]]:
    """Per step, the global batch as {global index -> tokens} gathered from every rank's micro batches."""
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
                    # MegatronPretrainingSampler: the global index of row i of micro batch j on rank r.
                    g = (consumed + s * t.global_batch_size + j * t.micro_batch_size * dp_size
                         + r * t.micro_batch_size + i)
                    got[g] = b["tokens"][i]
        out.append(got)
    return out


@pytest.mark.parametrize("dp_size", [1, 2, 4], ids=lambda d: f"dp{d}")
def test_rank_split_matches_dataset_index(dp_size):
    cfg = _cfg()
    ds = MQARDataset(cfg.data.mqar, cfg.train.seq_length, cfg.train.seed)
    for step in _stream(cfg, dp_size, steps=3):
        for g, tokens in step.items():
            assert torch.equal(tokens, ds[g]["tokens"]), g


def test_any_rank_split_and_resume_gives_the_same_stream():
    cfg = _cfg()
    ref = _stream(cfg, 1, steps=5)
    gbs = cfg.train.global_batch_size
    for dp_size in (2, 4):
        assert all(a.keys() == b.keys() and all(torch.equal(a[g], b[g]) for g in a)
                   for a, b in zip(ref, _stream(cfg, dp_size, steps=5)))
    for dp_size, resume_step in ((1, 2), (2, 3), (4, 1)):
        resumed = _stream(cfg, dp_size, steps=5 - resume_step, consumed=resume_step * gbs)
        for a, b in zip(ref[resume_step:], resumed):
            assert a.keys() == b.keys() and all(torch.equal(a[g], b[g]) for g in a)


def test_valid_stream_is_disjoint_from_train():
    cfg = _cfg()
    train = torch.stack([v for step in _stream(cfg, 1, steps=4) for v in step.values()])
    valid = torch.stack([v for step in _stream(cfg, 1, steps=4, which=1) for v in step.values()])
    assert not any(torch.equal(v, t) for v in valid for t in train)


@pytest.mark.parametrize("n,k,v,t", SHAPES, ids=[f"N{n}-K{k}-V{v}-T{t}" for n, k, v, t in SHAPES])
def test_structure(n, k, v, t):
    ds = MQARDataset(MQARConfig(num_kv_pairs=n, num_keys=k, num_values=v), t, seed=42)
    for idx in range(20):
        s = ds[idx]
        tokens, labels, mask, pos = s["tokens"], s["labels"], s["loss_mask"], s["position_ids"]
        assert tokens.shape == labels.shape == mask.shape == pos.shape == (t,)
        assert tokens.dtype == labels.dtype == pos.dtype == torch.int64 and mask.dtype == torch.float32
        assert torch.equal(pos, torch.arange(t))
        # One stream: labels are the next tokens; id 0 is reserved and never emitted.
        assert torch.equal(labels[:-1], tokens[1:])
        assert tokens.min() >= 1 and max(tokens.max(), labels.max()) <= k + v
        keys, values = tokens[0:2 * n:2], tokens[1:2 * n:2]
        assert ((keys >= 1) & (keys <= k)).all() and ((values > k) & (values <= k + v)).all()
        assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
        pair = dict(zip(keys.tolist(), values.tolist()))
        queried = mask.nonzero().flatten().tolist()
        assert len(queried) == n
        assert all(q >= 2 * n for q in queried)
        # Every scored label is the value paired with the query key in this sequence, each key queried once.
        assert sorted(tokens[queried].tolist()) == sorted(pair)
        for q in queried:
            assert labels[q].item() == pair[tokens[q].item()]
        # Keys of this sequence appear after the context only as scored queries (noise never uses them).
        for p in range(2 * n, t):
            assert (tokens[p].item() in pair) == (mask[p].item() == 1.0), p


def test_without_noise_the_rest_is_zero():
    n, t = 4, 63
    cfg = MQARConfig(num_kv_pairs=n, num_keys=16, num_values=16, random_non_queries=False)
    s = MQARDataset(cfg, t, seed=42)[0]
    queried = s["loss_mask"].nonzero().flatten()
    filled = torch.zeros(t, dtype=torch.bool)
    filled[:2 * n] = True
    filled[queried] = True
    filled[(queried + 1).clamp(max=t - 1)] = True
    assert (s["tokens"][~filled] == 0).all() and (s["tokens"][filled] > 0).all()
    assert (s["labels"][queried] > 16).all()


def test_queries_follow_a_power_law():
    """Zoology's placement (a=0.01) puts most queries soon after the context; uniform would spread them out."""
    n, t = 4, 200
    ds = MQARDataset(MQARConfig(num_kv_pairs=n, num_keys=16, num_values=16), t, seed=42)
    gaps = torch.cat([(ds[i]["loss_mask"].nonzero().flatten() - 2 * n) // 2 for i in range(200)]).float()
    space = (t - 2 * n) // 2
    # p(gap) ~ 1/gap: median near sqrt(space), about 10 here, against (space - 1) / 2 = 47.5 for uniform gaps.
    assert gaps.median() < (space - 1) / 4


def _onehot(labels: torch.Tensor, v: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, v).float()


def test_accuracy_perfect_shuffled_and_partial():
    cfg = _cfg(n=8, k=64, v=64, t=128, mbs=4)
    v = vocab_size_needed(cfg)
    assert v == 129
    batch = next(build_data_iterators(cfg, dp_rank=0, dp_size=1)[1])
    perfect = _onehot(batch["labels"], v)
    acc = evaluate_batch(cfg, perfect, batch)["mqar_accuracy"]
    assert acc.dim() == 0 and acc.dtype == torch.float32 and acc.item() == 1.0
    # Logits of other sequences: their values rarely match this batch's.
    shuffled = _onehot(batch["labels"].roll(1, dims=0), v)
    assert mqar_accuracy(shuffled, batch).item() < 0.2
    # Wrong on exactly half of the scored positions (labels + 1 stays a value or leaves the value range).
    wrong = batch["labels"].clone()
    masked = batch["loss_mask"].nonzero()
    half = masked[::2]
    wrong[half[:, 0], half[:, 1]] = 0
    assert mqar_accuracy(_onehot(wrong, v), batch).item() == pytest.approx(len(half) / len(masked))
    # Unscored positions do not count.
    junk = batch["labels"].clone()
    junk[batch["loss_mask"] == 0] = 0
    assert mqar_accuracy(_onehot(junk, v), batch).item() == 1.0


def test_accuracy_without_scored_positions_is_zero_not_nan():
    batch = {"labels": torch.zeros(2, 5, dtype=torch.int64), "loss_mask": torch.zeros(2, 5)}
    assert mqar_accuracy(torch.randn(2, 5, 7), batch).item() == 0.0


def test_batches_shape_and_dtype():
    cfg = _cfg(t=63, mbs=3, gbs=6)
    for it in build_data_iterators(cfg, dp_rank=1, dp_size=2, consumed_samples=6):
        b = next(it)
        assert set(b) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert all(x.shape == (3, 63) for x in b.values())
        assert b["loss_mask"].dtype == torch.float32 and b["tokens"].dtype == torch.int64


@pytest.mark.parametrize("field,value,match", [
    ("num_values", 3, "num_kv_pairs=4 must be <= data.mqar.num_values=3"),
    ("num_keys", 3, "num_kv_pairs=4 must be <= data.mqar.num_keys=3"),
    ("power_a", 0.0, "power_a"),
])
def test_bad_settings_name_the_field(field, value, match):
    cfg = MQARConfig(num_kv_pairs=4, num_keys=16, num_values=16)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        MQARDataset(cfg, 63, seed=42)
    with pytest.raises(ValueError, match="too short"):
        MQARDataset(MQARConfig(num_kv_pairs=4), 15, seed=42)


def test_bad_rank_and_consumed():
    cfg = _cfg()
    with pytest.raises(ValueError, match="dp_rank"):
        build_data_iterators(cfg, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="consumed_samples"):
        build_data_iterators(cfg, dp_rank=0, dp_size=1, consumed_samples=-1)
