"""Context parallelism in the mixer layers: CP2 and CP4 (gloo, CPU processes) of every linear mixer and of MoM equal
CP1 with the same weights, output and every gradient, for dense batches (Megatron's zigzag split) and packed THD
batches (each document split that way).

One spawn of 4 processes serves both CP sizes. Each rank builds the layer twice from one seed (CP1 and CP), runs the
whole sequence through the CP1 layer itself, runs its own tokens through the CP layer, and compares its slice of the
output and input gradient; parameter gradients are summed over the CP group first (Megatron's DDP reduces them over
data x context ranks). Lengths are 2 * cp * odd, so every local piece has an odd length, and some THD pieces are
shorter than the conv halo.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core.packed_seq_params import PackedSeqParams

pytestmark = pytest.mark.slow

HIDDEN, HEADS, HEAD_DIM, B = 32, 4, 8, 2
LAYERS = {
    "linear_attention": ("linear_attention", {}),
    "retention": ("retention", {}),
    "gla": ("gla", {}),
    "deltanet": ("deltanet", {}),
    "gated_deltanet": ("gated_deltanet", {}),
    "mamba2": ("mamba2", {"num_groups": 2}),
    # the aux and z losses are part of the gradients compared (each CP rank's share sums to the full loss)
    "mom-gated_delta": ("mom", {"num_memories": 3, "topk": 2, "z_loss_coeff": 0.01, "aux_loss_coeff": 0.1}),
    "mom-gla": ("mom", {"memory_kind": "gla", "num_memories": 4, "topk": 2, "aux_loss_type": "global"}),
}
LAYOUTS = ("dense", "thd")
# fp32 (the kernels take no fp64); the split scan reassociates the state sums (see test_context_parallel.py). Measured
# worst: 1.7e-6 (a per-head scalar's gradient, summed over all tokens), typical 3e-7.
TOL = 1e-5


def thd_lengths(cp: int) -> list[int]:
    # documents of 2 * cp * odd tokens (and an empty one); local pieces of 1 token, shorter than the conv halo of 3
    return {2: [12, 0, 4, 20], 4: [8, 0, 24, 8]}[cp]


def local_index(cp: int, r: int, layout: str) -> torch.Tensor:
    """Global token positions CP rank r holds, in local order (Megatron's split, written out independently)."""
    lens = thd_lengths(cp) if layout == "thd" else [2 * cp * 5]
    out, start = [], 0
    for n in lens:
        c = n // (2 * cp)
        out += [torch.arange(start + r * c, start + (r + 1) * c),
                torch.arange(start + (2 * cp - 1 - r) * c, start + (2 * cp - r) * c)]
        start += n
    return torch.cat(out)


def build(name: str, overrides: dict, pg_collection):
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from linear_moe.registry import get_mixer

    tc = TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, use_cpu_initialization=True,
                           add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                           gradient_accumulation_fusion=False, bias_dropout_fusion=False,
                           masked_softmax_fusion=False, persist_layer_norm=False, params_dtype=torch.float32)
    cls = get_mixer(name)
    cfg = cls.Config(num_heads=HEADS, head_dim=HEAD_DIM, backend="torch", **overrides)
    torch.manual_seed(42)
    return build_module(ModuleSpec(module=cls, params={"mixer_config": cfg}), config=tc, layer_number=1,
                        pg_collection=pg_collection)


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_case(layer_id: str, layout: str, cp: int) -> dict[str, float]:
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    name, overrides = LAYERS[layer_id]
    group = ps.get_context_parallel_group()
    r = dist.get_rank(group)
    ref = build(name, overrides, ProcessGroupCollection(tp=ps.get_tensor_model_parallel_group()))
    layer = build(name, overrides, ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"]))
    assert layer.cp_group is not None and ref.cp_group is None
    layer.load_state_dict(ref.state_dict())

    b = 1 if layout == "thd" else B
    T = sum(thd_lengths(cp)) if layout == "thd" else 2 * cp * 5
    kw = {}
    if layout == "thd":
        cu = torch.tensor([0] + thd_lengths(cp)).cumsum(0).to(torch.int32)
        kw["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                  cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu)
    torch.manual_seed(7)
    x = torch.randn(T, b, HIDDEN)
    w = torch.randn(T, b, HIDDEN)
    idx = local_index(cp, r, layout)

    xr = x.clone().requires_grad_()
    out_ref, _ = ref(xr, None, **kw)
    (out_ref * w).sum().backward()
    xl = x[idx].clone().requires_grad_()
    out, _ = layer(xl, None, **kw)
    (out * w[idx]).sum().backward()

    errs = {"out": relerr(out, out_ref[idx]), "d_input": relerr(xl.grad, xr.grad[idx])}
    ref_params = dict(ref.named_parameters())
    for pname, p in layer.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        errs[f"d_{pname}"] = relerr(g, ref_params[pname].grad)
    return errs


def worker(rank: int, world: int, init_file: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from linear_moe.cpu import enable_cpu_mode

    enable_cpu_mode()
    results = {}
    for cp in (2, 4):
        # CP2 on 4 processes: two CP groups (data-parallel replicas) run the same case
        ps.initialize_model_parallel(1, 1, context_parallel_size=cp)
        if cp == 2:
            try:
                build("mom", {"capacity_factor": 1.0},
                      ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"]))
                results["capacity_error"] = ""
            except ValueError as e:
                results["capacity_error"] = str(e)
        for layer_id in LAYERS:
            for layout in LAYOUTS:
                errs = run_case(layer_id, layout, cp)
                gathered = [None] * world
                dist.all_gather_object(gathered, errs)
                results[f"cp{cp}-{layer_id}-{layout}"] = {k: max(g[k] for g in gathered) for k in errs}
        ps.destroy_model_parallel()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


@functools.cache
def _spawn_all() -> dict[str, dict[str, float]] | str:
    try:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "errors.json")
            mp.spawn(worker, args=(4, os.path.join(d, "init"), out), nprocs=4, join=True)
            with open(out) as f:
                return json.load(f)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("cp", [2, 4], ids=lambda c: f"cp{c}")
def test_cp_layer_equals_cp1(cp, layer_id, layout):
    res = _spawn_all()
    if isinstance(res, str):
        pytest.fail(f"a CP worker failed: {res}")
    errs = res[f"cp{cp}-{layer_id}-{layout}"]
    assert {"out", "d_input", "d_in_proj.weight", "d_o_proj.weight"} <= errs.keys()
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_mom_capacity_with_cp_is_an_error():
    res = _spawn_all()
    if isinstance(res, str):
        pytest.fail(f"a CP worker failed: {res}")
    assert "mixers.mom.capacity_factor" in res["capacity_error"] and "parallel.context" in res["capacity_error"]
