"""Context parallelism: CP2 and CP4 (gloo, CPU processes) equal the unsplit scan on one process.

One spawn per CP size runs every case; each rank builds the same seeded global inputs, runs the unsplit reference
itself, and compares its local slice of the output and of every input gradient (gradients of replicated tensors,
h0 and the conv weight, are summed over the group first). Rank 0 records the worst relative error per quantity.
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
import torch.nn.functional as F
from linear_moe.kernels.delta_rule import chunk_delta_rule, naive_recurrent_delta_rule, torch_chunk_delta_rule
from linear_moe.kernels.gla import chunk_gla, naive_recurrent_gla, torch_chunk_gla

from linear_moe.modules.context_parallel import (
    cp_halo,
    cp_local_cu_seqlens,
    cp_pieces,
    cp_scan,
    cp_token_piece,
    cp_unpieces,
)
from linear_moe.modules.short_conv import ShortConvolution

pytestmark = pytest.mark.slow

H, K, V, C, M = 2, 4, 3, 5, 2
# fp32 throughout; the split scan reassociates sums, so allow a few ulps of growth over ~40 steps
TOL = 2e-5


# the CPU paths of chunk_gla / chunk_delta_rule with small chunks (torch_chunk_gla's sub-chunks need a multiple of 16)
_gla = functools.partial(torch_chunk_gla, chunk_size=16)
_delta = functools.partial(torch_chunk_delta_rule, use_qk_l2norm=True, chunk_size=4)
_delta_ref = functools.partial(naive_recurrent_delta_rule, use_qk_l2norm=True)
OPS = {
    # name: (CP fn, unsplit reference fn, gate kind, uses beta)
    "gla": (_gla, naive_recurrent_gla, None, False),
    "gla_scalar": (_gla, naive_recurrent_gla, "scalar", False),
    "gla_vector": (_gla, naive_recurrent_gla, "vector", False),
    "delta": (_delta, _delta_ref, None, True),
    "delta_gated": (_delta, _delta_ref, "scalar", True),
    # the public entry points as a mixer calls them (no host read of cu_seqlens)
    "gla_public": (functools.partial(chunk_gla, check_inputs=False), naive_recurrent_gla, "vector", False),
    "delta_public": (functools.partial(chunk_delta_rule, use_qk_l2norm=True, check_inputs=False), _delta_ref,
                     "scalar", True),
}


def contiguous_lengths(cp: int) -> list[int]:
    # odd lengths, and pieces shorter than the conv halo (3)
    return {2: [7, 4], 4: [7, 1, 2, 5]}[cp]


def thd_lengths(cp: int) -> list[int]:
    return {2: [8, 0, 4, 12], 4: [8, 0, 16, 8]}[cp]


def total_length(cp: int, layout: str) -> int:
    if layout == "contiguous":
        return sum(contiguous_lengths(cp))
    if layout == "thd":
        return sum(thd_lengths(cp))
    return 2 * cp * 5  # odd chunks of 5


def global_cu(cp: int, layout: str) -> torch.Tensor:
    T = total_length(cp, layout)
    if layout == "thd":
        return torch.tensor([0] + thd_lengths(cp)).cumsum(0)
    # a zero-length segment, segments crossing rank borders, a trailing empty segment
    return torch.tensor([0, 3, 3, T // 2 + 1, T, T])


def local_index(cp: int, r: int, layout: str) -> torch.Tensor:
    """Global token indices held by CP rank r, in local order (written independently of the module)."""
    T = total_length(cp, layout)
    if layout == "contiguous":
        lens = contiguous_lengths(cp)
        s = sum(lens[:r])
        return torch.arange(s, s + lens[r])
    if layout == "thd":
        out, start = [], 0
        for n in thd_lengths(cp):
            c = n // (2 * cp)
            out += [torch.arange(start + r * c, start + (r + 1) * c),
                    torch.arange(start + (2 * cp - 1 - r) * c, start + (2 * cp - r) * c)]
            start += n
        return torch.cat(out)
    L = T // (2 * cp)
    return torch.cat([torch.arange(r * L, (r + 1) * L), torch.arange((2 * cp - 1 - r) * L, (2 * cp - r) * L)])


SCAN_CASES = (
    [("dense", lay, op, True) for lay in ("megatron", "contiguous") for op in OPS if "public" not in op]
    + [("dense", "megatron", op, False) for op in ("gla_vector", "delta_gated")]
    + [("varlen", lay, op, True) for lay in ("megatron", "contiguous", "thd") for op in ("gla_vector", "delta_gated")]
    + [(mode, "megatron", op, True) for mode in ("dense", "varlen") for op in ("gla_public", "delta_public")]
    + [("mom", lay, op, True) for lay in ("megatron", "contiguous") for op in ("gla_scalar", "delta_gated")]
)
HALO_CASES = [("dense", "megatron"), ("dense", "contiguous"), ("varlen", "megatron"), ("varlen", "contiguous"),
              ("varlen", "thd"), ("mom", "megatron"), ("mom", "contiguous")]


def scan_id(case) -> str:
    mode, lay, op, rerun = case
    return f"{mode}-{lay}-{op}" + ("" if rerun else "-linearfix")


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(op: str, B: int, T: int, N: int, dims: tuple[int, int, int] = (H, K, V), device="cpu"):
    """Seeded global inputs (drawn on the CPU): q, k, v, extras (beta?, g), h0, output weights."""
    _, _, gate, beta = OPS[op]
    H, K, V = dims
    torch.manual_seed(42)
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    extras = []
    if beta:
        extras.append(torch.rand(B, T, H).sigmoid())
    if gate == "scalar":
        extras.append(F.logsigmoid(torch.randn(B, T, H) + 2))
    elif gate == "vector":
        extras.append(F.logsigmoid(torch.randn(B, T, H, K) + 2))
    else:
        extras.append(None)
    h0 = torch.randn(N, H, K, V)
    wo, wf = torch.randn(B, T, H, V), torch.randn(N, H, K, V)
    inputs = [None if x is None else x.to(device) for x in [q, k, v, *extras]]
    return inputs, h0.to(device), wo.to(device), wf.to(device)


def leaves(xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def grads(xs):
    return [torch.zeros(()) if x is None else x.grad for x in xs]


def run_scan_case(case, cp: int, r: int, group, dims: tuple[int, int, int] = (H, K, V), device="cpu"):
    """Errors of one cp_scan case on this rank: {quantity: relative error}."""
    mode, layout, op, rerun = case
    fn, ref_fn, _, _ = OPS[op]
    H, _, V = dims
    T = total_length(cp, layout)
    B = 2 if mode != "varlen" else 1
    idx = local_index(cp, r, layout).to(device)
    cu = global_cu(cp, layout).to(device) if mode == "varlen" else None
    N = B * M if mode == "mom" else (cu.numel() - 1 if cu is not None else B)
    inputs, h0, wo, wf = make_inputs(op, B, T, N, dims, device)
    ref_in, ref_h0 = leaves(inputs), leaves([h0])[0]

    if mode == "mom":
        # tokens routed to one of M memories; memory (b, m) runs over its tokens in order
        torch.manual_seed(7)
        mem = torch.randint(0, M, (B, T)).to(device)
        key = (torch.arange(B, device=device)[:, None] * M + mem).flatten()
        perm = torch.argsort(key, stable=True)
        ref_cu = F.pad(torch.bincount(key, minlength=N).cumsum(0), (1, 0))
        packed = [None if x is None else x.flatten(0, 1)[perm][None] for x in ref_in]
        o_p, ref_final = ref_fn(*packed, initial_state=ref_h0, output_final_state=True, cu_seqlens=ref_cu)
        ref_o = torch.empty_like(o_p[0]).index_copy(0, perm, o_p[0]).view(B, T, H, V)
    else:
        ref_o, ref_final = ref_fn(*ref_in, initial_state=ref_h0, output_final_state=True, cu_seqlens=cu)
    ((ref_o * wo).sum() + (ref_final * wf).sum()).backward()

    loc = leaves([None if x is None else x[:, idx] for x in inputs])
    loc_h0 = leaves([h0])[0]
    if mode == "mom":
        Tl = idx.numel()
        J = 1 if layout == "contiguous" else 2
        j = cp_token_piece(Tl, layout, device)
        lkey = ((j[None] * B + torch.arange(B, device=device)[:, None]) * M + mem[:, idx]).flatten()
        lperm = torch.argsort(lkey, stable=True)
        lcu = F.pad(torch.bincount(lkey, minlength=J * N).cumsum(0), (1, 0))
        packed = [None if x is None else x.flatten(0, 1)[lperm][None] for x in loc]
        o_p, final = cp_scan(fn, *packed, cp_group=group, layout=layout, local_cu_seqlens=lcu,
                             initial_state=loc_h0, output_final_state=True)
        o = torch.empty_like(o_p[0]).index_copy(0, lperm, o_p[0]).view(B, Tl, H, V)
    elif op.endswith("public"):
        # as the mixers call it: per-step tensors by keyword, split by cp_scan like q
        per_step = dict(zip(["beta", "g"] if OPS[op][3] else ["g"], loc[3:]))
        o, final = cp_scan(fn, *loc[:3], cp_group=group, layout=layout, cu_seqlens=cu, initial_state=loc_h0,
                           output_final_state=True, rerun=rerun, **per_step)
    else:
        o, final = cp_scan(fn, *loc, cp_group=group, layout=layout, cu_seqlens=cu, initial_state=loc_h0,
                           output_final_state=True, rerun=rerun)
    owner = cp - 1 if layout == "contiguous" else 0
    assert (final is not None) == (r == owner), f"rank {r}: the final state belongs to rank {owner} only"
    loss = (o * wo[:, idx]).sum() + ((final * wf).sum() if final is not None else 0)
    loss.backward()
    dh0 = loc_h0.grad if loc_h0.grad is not None else torch.zeros_like(h0)
    dist.all_reduce(dh0, group=group)

    errs = {"o": relerr(o, ref_o[:, idx]), "dh0": relerr(dh0, ref_h0.grad)}
    if final is not None:
        errs["final"] = relerr(final, ref_final)
    names = ["dq", "dk", "dv"] + (["dbeta"] if OPS[op][3] else []) + ["dg"]
    for name, a, b in zip(names, grads(loc), grads(ref_in)):
        if b.dim():
            errs[name] = relerr(a, b[:, idx])
    return errs


def run_halo_case(case, cp: int, r: int, group) -> dict[str, float]:
    mode, layout = case
    T = total_length(cp, layout)
    B = 2 if mode != "varlen" else 1
    idx = local_index(cp, r, layout)
    cu = global_cu(cp, layout) if mode == "varlen" else None
    torch.manual_seed(42)
    conv = ShortConvolution(C, 4)
    x = torch.randn(B, T, C)
    w = torch.randn(B, T, C)
    xr = x.clone().requires_grad_()
    if mode == "mom":
        # MoM's conv runs over each (sequence, memory) segment of routed tokens
        mem = torch.randint(0, M, (B, T))
        key = (torch.arange(B)[:, None] * M + mem).flatten()
        perm = torch.argsort(key, stable=True)
        ref_cu = F.pad(torch.bincount(key, minlength=B * M).cumsum(0), (1, 0))
        y_p, _ = conv(xr.flatten(0, 1)[perm][None], cu_seqlens=ref_cu)
        y_ref = torch.empty_like(y_p[0]).index_copy(0, perm, y_p[0]).view(B, T, C)
    else:
        y_ref, _ = conv(xr, cu_seqlens=cu)
    (y_ref * w).sum().backward()
    dw_ref = conv.weight.grad.clone()
    conv.weight.grad = None

    xl = x[:, idx].clone().requires_grad_()
    if mode == "mom":
        Tl, J = idx.numel(), 1 if layout == "contiguous" else 2
        lkey = ((cp_token_piece(Tl, layout)[None] * B + torch.arange(B)[:, None]) * M + mem[:, idx]).flatten()
        lperm = torch.argsort(lkey, stable=True)
        lcu = F.pad(torch.bincount(lkey, minlength=J * B * M).cumsum(0), (1, 0))
        xp = xl.flatten(0, 1)[lperm][None]
        halo = cp_halo(xp, group, width=3, layout=layout, local_cu_seqlens=lcu)
        y_p, _ = conv(xp, cu_seqlens=lcu, initial_state=halo)
        y = torch.empty_like(y_p[0]).index_copy(0, lperm, y_p[0]).view(B, Tl, C)
    elif cu is None:
        halo = cp_halo(xl, group, width=3, layout=layout)
        y, _ = conv(cp_pieces(xl, layout), initial_state=halo)
        y = cp_unpieces(y, B, layout)
    else:
        halo = cp_halo(xl, group, width=3, layout=layout, cu_seqlens=cu)
        y, _ = conv(xl, cu_seqlens=cp_local_cu_seqlens(cu, idx.numel(), group, layout), initial_state=halo)
    (y * w[:, idx]).sum().backward()
    dw = conv.weight.grad.clone()
    dist.all_reduce(dw, group=group)
    return {"y": relerr(y, y_ref[:, idx]), "dx": relerr(xl.grad, xr.grad[:, idx]), "dweight": relerr(dw, dw_ref)}


def run_cases(cp: int, group) -> dict[str, dict[str, float]] | None:
    """Every case on one CP group; the worst error per quantity over its ranks, on its rank 0 (else None)."""
    r = dist.get_rank(group)
    results = {}
    for case in SCAN_CASES:
        results["scan-" + scan_id(case)] = run_scan_case(case, cp, r, group)
    for case in HALO_CASES:
        results["halo-" + "-".join(case)] = run_halo_case(case, cp, r, group)
    gathered = [None] * cp
    dist.all_gather_object(gathered, results, group=group)
    return {c: {k: max(g[c].get(k, 0.0) for g in gathered) for k in set().union(*(g[c] for g in gathered))}
            for c in results} if r == 0 else None


def worker(rank: int, world: int, init_file: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # one set of processes serves every CP size (process start-up dominates the runtime); CP2 runs on ranks 0-1
    # while the others wait, then CP4 on all four
    cp2 = dist.new_group([0, 1])
    results = {}
    if rank < 2:
        results[2] = run_cases(2, cp2)
    dist.barrier()
    results[4] = run_cases(4, dist.group.WORLD)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


@functools.cache
def _spawn_all() -> dict[str, dict[str, dict[str, float]]] | str:
    """Errors of every case, or the worker's failure (kept, so the spawn is not retried once per test)."""
    try:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "errors.json")
            mp.spawn(worker, args=(4, os.path.join(d, "init"), out), nprocs=4, join=True)
            with open(out) as f:
                return json.load(f)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def cp_results(cp: int) -> dict[str, dict[str, float]]:
    res = _spawn_all()
    if isinstance(res, str):
        pytest.fail(f"a CP worker failed: {res}")
    return res[str(cp)]


def check(errs: dict[str, float], must: set[str]) -> None:
    assert must <= errs.keys(), f"missing {must - errs.keys()}"
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("cp", [2, 4], ids=lambda c: f"cp{c}")
@pytest.mark.parametrize("case", SCAN_CASES, ids=scan_id)
def test_cp_scan_equals_unsplit(case, cp):
    must = {"o", "final", "dh0", "dq", "dk", "dv"} | ({"dg"} if OPS[case[2]][2] else set())
    check(cp_results(cp)["scan-" + scan_id(case)], must | ({"dbeta"} if OPS[case[2]][3] else set()))


@pytest.mark.parametrize("cp", [2, 4], ids=lambda c: f"cp{c}")
@pytest.mark.parametrize("case", HALO_CASES, ids=lambda c: "-".join(c))
def test_cp_halo_equals_unsplit_conv(case, cp):
    check(cp_results(cp)["halo-" + "-".join(case)], {"y", "dx", "dweight"})


# On GPUs: NCCL (reduce-scatter in the backward) and the Triton kernels (V + K wide state, empty segments) under CP.
GPU_CASES = [(mode, lay, op, True) for mode, lay in (("dense", "megatron"), ("dense", "contiguous"),
                                                      ("varlen", "megatron"), ("varlen", "contiguous"),
                                                      ("varlen", "thd"), ("mom", "megatron"))
             for op in ("gla_public", "delta_public")] + [("dense", "megatron", "gla_public", False)]
GPU_DIMS = (4, 64, 32)  # H, K, V
# the Triton kernels' fp32 dots may run in tf32 on the GPU, the naive reference does not
GPU_TOL = 5e-3


def gpu_worker(rank: int, world: int, init_file: str, out_path: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for case in GPU_CASES:
        errs = run_scan_case(case, world, rank, dist.group.WORLD, GPU_DIMS, f"cuda:{rank}")
        gathered = [None] * world
        dist.all_gather_object(gathered, errs)
        results[scan_id(case)] = {k: max(g.get(k, 0.0) for g in gathered) for k in set().union(*gathered)}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cp_scan_nccl_triton_equals_unsplit():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "errors.json")
        mp.spawn(gpu_worker, args=(2, os.path.join(d, "init"), out), nprocs=2, join=True)
        with open(out) as f:
            res = json.load(f)
    print(json.dumps(res, indent=1))
    bad = {c: {k: e for k, e in errs.items() if not e <= GPU_TOL} for c, errs in res.items()}
    assert not any(bad.values()), f"relative errors above {GPU_TOL}: { {c: b for c, b in bad.items() if b} }"
