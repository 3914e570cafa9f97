"""MoM's projection and dispatch (kernels/mom_dispatch.py).

The fused dispatch (Triton under the interpreter on CPU) equals its definition: every output, and the gradients of
the dense projections and of the routed rows for random gradients of every output (or of some, the others unused);
k' = 1..3, with and without the shared memory, the output gate and beta, K / V powers of two or not, routed rows
padded or not, rows that no slot reads. Outputs and gradients are poisoned with NaN, so an element the kernels leave
unwritten fails.

`project` (the grouped GEMM over the routed pairs, and the every-token-every-memory fallback) equals projecting every
token for every memory with one GEMM and picking each slot's rows: the pieces and the gradients of x and of both
weights, including a memory that no token chose.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from linear_moe.kernels import mom_dispatch
from linear_moe.kernels.common import stable_sort_small
from linear_moe.kernels.mom_dispatch import dispatch, naive_dispatch, project

H, N, MT = 2, 13, 4


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def poisoned_empty(monkeypatch):
    empty = torch.empty

    def poisoned(*a, **kw):
        t = empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def routing(kp, shared, memories=MT):
    """Distinct routed memories per token (the shared one, index `memories`, last) and a random slot permutation."""
    kr = kp - shared
    routed = torch.stack([torch.randperm(memories)[:kr] for _ in range(N)])
    if shared:
        routed = torch.cat([routed, torch.full((N, 1), memories)], 1)
    return torch.randperm(N * kp).view(N, kp), routed


def run(xd, yr, slot_of, row_of, grads, dims, backend, used):
    xd, yr = xd.clone().requires_grad_(), yr.clone().requires_grad_()
    out = dispatch(xd, yr, slot_of, row_of, **dims, backend=backend)
    loss = sum((t.float() * grads[i]).sum() for i, t in enumerate(out) if t is not None and i in used)
    loss.backward()
    return out, xd.grad, yr.grad


@pytest.mark.parametrize("kp,shared,K,V,gate,beta,extra_rows,pad", [
    (1, False, 16, 32, True, True, 0, 0), (2, False, 16, 32, False, False, 5, 0), (3, True, 12, 20, True, False, 0, 3),
    (3, False, 16, 32, False, True, 7, 2)],
    ids=["k1-K16-V32-gate-beta", "k2-K16-V32-unread-rows", "k3-shared-K12-V20-gate-padded",
         "k3-K16-V32-beta-unread-padded"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_triton_equals_definition(kp, shared, K, V, gate, beta, extra_rows, pad, dtype, tol, poisoned_empty):
    torch.manual_seed(0)
    dims = {"heads": H, "k_dim": K, "v_dim": V, "has_gate": gate, "has_beta": beta}
    dm = K + V + 1 + beta
    ud = K + (V if gate else 0) + shared * dm
    slot_of, _ = routing(kp, shared)
    kr = kp - shared
    # routed rows in a random order, some rows read by no slot
    R = N * kr + extra_rows
    row_of = torch.randperm(R)[:N * kr].view(N, kr)
    xd = torch.randn(N, H * ud, dtype=dtype)
    yr = torch.randn(R, H * dm + pad, dtype=dtype)
    ref = naive_dispatch(xd.float(), yr.float(), slot_of, row_of, **dims)
    # gradients representable in the dtype, so the copied ones can be compared exactly
    grads = [None if t is None else torch.randn_like(t).to(dtype).float() for t in ref]
    for used in ({0, 1, 2, 3, 4, 5}, {1, 2, 3}):
        got, dxd, dyr = run(xd, yr, slot_of, row_of, grads, dims, "triton", used)
        _, dxd_ref, dyr_ref = run(xd.float(), yr.float(), slot_of, row_of, grads, dims, "torch", used)
        for name, t, r in zip(got._fields, got, ref, strict=True):
            assert (t is None) == (r is None), name
            if t is not None:
                assert t.dtype == dtype and t.is_contiguous(), name
                assert torch.equal(t.float(), r), name  # copies: exact
        assert dxd.shape == xd.shape and dyr.shape == yr.shape and dxd.dtype == dyr.dtype == dtype
        # routed rows (with unread rows and padding zero) and the gate / shared columns are copies; q's gradient
        # is a sum of k' slot gradients (fp32, then the dtype)
        assert torch.equal(dyr.float(), dyr_ref), used
        dxd, dxd_ref = dxd.view(N, H, ud), dxd_ref.view(N, H, ud)
        assert torch.equal(dxd[..., K:].float(), dxd_ref[..., K:]), used
        assert rel(dxd[..., :K], dxd_ref[..., :K]) < tol, (used, rel(dxd[..., :K], dxd_ref[..., :K]))


def test_head_shaped_inputs(poisoned_empty):
    """xd as [N, H, UD] and yr as [R, H, DM] give the same pieces, and their gradients come back in those shapes."""
    torch.manual_seed(0)
    dims = {"heads": H, "k_dim": 8, "v_dim": 8, "has_gate": True, "has_beta": True}
    slot_of, _ = routing(3, True)
    row_of = torch.randperm(N * 2).view(N, 2)
    xd, yr = torch.randn(N, H, 8 + 8 + 18), torch.randn(N * 2, H, 18)
    ref = naive_dispatch(xd, yr, slot_of, row_of, **dims)
    grads = [None if t is None else torch.randn_like(t) for t in ref]
    got, dxd, dyr = run(xd, yr, slot_of, row_of, grads, dims, "triton", {0, 1, 2, 3, 4, 5})
    _, dxd_ref, dyr_ref = run(xd, yr, slot_of, row_of, grads, dims, "torch", {0, 1, 2, 3, 4, 5})
    assert all(t is r is None or torch.equal(t, r) for t, r in zip(got, ref, strict=True))
    assert dxd.shape == xd.shape and dyr.shape == yr.shape
    assert rel(dxd, dxd_ref) < 1e-6 and torch.equal(dyr, dyr_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_router_columns(dtype, poisoned_empty):
    """With router logits, xd ends in router columns: the logits come back with their values, and their gradient
    lands in those columns (padding columns zero), in the Triton dispatch as in the straight-through definition; the
    other pieces and gradients are the same as without them. Also without a logits gradient (columns zero)."""
    torch.manual_seed(0)
    M = 5
    C = mom_dispatch.router_columns(M)
    assert C == 8
    dims = {"heads": H, "k_dim": 8, "v_dim": 8, "has_gate": True, "has_beta": True}
    ud = 8 + 8 + 18
    slot_of, _ = routing(3, True)
    row_of = torch.randperm(N * 2).view(N, 2)
    xd, yr = torch.randn(N, H * ud + C, dtype=dtype), torch.randn(N * 2, H * 18, dtype=dtype)
    logits = torch.randn(N, M)
    for used in ({0, 1, 2, 3, 4, 5, 6}, {1, 2}):
        res = []
        for backend in ("triton", "torch"):
            x = xd.clone().requires_grad_()
            out = dispatch(x, yr, slot_of, row_of, **dims, logits=logits, backend=backend)
            assert torch.equal(out.logits, logits)
            torch.manual_seed(1)
            grads = [torch.randn(t.shape) for t in out]
            sum((t.float() * grads[i]).sum() for i, t in enumerate(out) if i in used).backward()
            res.append((out, x.grad, grads[6]))
        (got, dxd, dl), (ref, dxd_ref, _) = res
        for name, t, r in zip(got._fields, got, ref, strict=True):
            assert torch.equal(t.float(), r.float()), name
        tail = dxd[:, H * ud:].float()
        want = dl.to(dtype).float() if 6 in used else torch.zeros(N, M)
        assert torch.equal(tail[:, :M], want) and torch.count_nonzero(tail[:, M:]) == 0, used
        assert torch.equal(tail, dxd_ref[:, H * ud:].float())
        assert rel(dxd[:, :H * ud], dxd_ref[:, :H * ud]) < 2e-3
    with pytest.raises(ValueError, match="router columns"):
        dispatch(xd[:, :-1], yr, slot_of, row_of, **dims, logits=logits)


def test_bad_shapes():
    dims = {"heads": 2, "k_dim": 4, "v_dim": 4, "has_gate": False, "has_beta": False}
    slot_of, row_of = torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long)
    xd, yr = torch.randn(3, 2 * 13), torch.randn(3, 2 * 9)  # q 4 + shared 9 per head
    with pytest.raises(ValueError, match="dispatch takes"):
        dispatch(xd[:, :20], yr, slot_of, row_of, **dims)
    with pytest.raises(ValueError, match="dispatch takes"):
        dispatch(xd, yr[:, :17], slot_of, row_of, **dims)
    with pytest.raises(ValueError, match="dispatch takes"):
        dispatch(xd, yr, slot_of, torch.zeros(3, 3, dtype=torch.long), **dims)


def project_reference(x, weight, slot_of, memories, dims, M, shared):
    """Every token projected for every memory by one GEMM of the unit-laid-out weight (q, [gate], then each memory's
    rows, the shared one last), then each slot's rows picked by the definition of the dispatch."""
    heads = dims["heads"]
    dm = dims["k_dim"] + dims["v_dim"] + 1 + dims["has_beta"]
    lead = dims["k_dim"] + (dims["v_dim"] if dims["has_gate"] else 0)
    full = F.linear(x, weight).view(x.shape[0], heads, -1)  # [N, H, unit]
    xd = torch.cat([full[..., :lead], full[..., lead + M * dm:]], -1)
    yr = full[..., lead:lead + M * dm].reshape(x.shape[0], heads, M, dm).transpose(1, 2).reshape(-1, heads * dm)
    row_of = torch.arange(x.shape[0], device=x.device)[:, None] * M + memories[:, :slot_of.shape[1] - shared]
    return naive_dispatch(xd, yr, slot_of, row_of, **dims)


def unit_width(K, V, gate, beta, M, shared):
    return K + (V if gate else 0) + (M + shared) * (K + V + 1 + beta)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "every-memory"])
@pytest.mark.parametrize("kp,shared,gate,beta,backend,router", [(3, True, True, True, "torch", False),
                                                               (2, False, False, True, "torch", True),
                                                               (3, True, True, False, "triton", False),
                                                               (3, True, True, True, "triton", True)],
                         ids=["k2-shared-gate-beta", "k2-noshared-beta-router", "k2-shared-gate-nobeta-triton",
                              "k2-shared-gate-beta-router-triton"])
def test_project_equals_every_memory_gemm(grouped, kp, shared, gate, beta, backend, router, monkeypatch,
                                          poisoned_empty):
    """Memory 0 is chosen by no token (an empty group); odd widths (K 6, V 10) make the grouped rows need padding.
    With the router on the dense GEMM, its logits' gradient reaches x and the router's weight as F.linear's does."""
    torch.manual_seed(0)
    monkeypatch.setattr(mom_dispatch, "grouped_gemm_ok", lambda x: grouped)
    K, V, h = 6, 10, 24
    dims = {"heads": H, "k_dim": K, "v_dim": V, "has_gate": gate, "has_beta": beta}
    slot_of, memories = routing(kp, shared, memories=MT - 1)
    memories[:, :kp - shared] += 1  # routed memories 1..3, none to memory 0
    if shared:
        memories[:, -1] = MT
    x = torch.randn(N, h, requires_grad=True)
    weight = torch.randn(H * unit_width(K, V, gate, beta, MT, shared), h, requires_grad=True)
    router_w = torch.randn(MT, h, requires_grad=True)

    def reference():
        out = project_reference(x, weight, slot_of, memories, dims, MT, shared)
        return out._replace(logits=F.linear(x, router_w)) if router else out

    grads = None
    res = []
    for fn in (lambda: project(x, weight, slot_of, memories, **dims, num_memories=MT, shared=shared,
                               router=(router_w, F.linear(x, router_w).detach()) if router else None, backend=backend),
               reference):
        out = fn()
        if grads is None:
            grads = [None if t is None else torch.randn_like(t) for t in out]
        sum((t * g).sum() for t, g in zip(out, grads, strict=True) if t is not None).backward()
        res.append((out, x.grad, weight.grad, router_w.grad))
        x.grad = weight.grad = router_w.grad = None
    (got, *dgot), (ref, *dref) = res
    for name, t, r in zip(got._fields, got, ref, strict=True):
        assert (t is None) == (r is None), name
        if t is not None:
            assert rel(t, r) < 1e-5, name
    for name, t, r in zip(("x", "weight", "router"), dgot, dref, strict=True):
        assert (t is None) == (not router) if name == "router" else t is not None, name
        if t is not None:
            assert rel(t, r) < 1e-5, name
    # the rows of the memory that no token chose
    lead = K + (V if gate else 0)
    dm = K + V + 1 + beta
    assert torch.count_nonzero(dgot[1].view(H, -1, h)[:, lead:lead + dm]) == 0


def test_project_bad_shapes():
    dims = {"heads": H, "k_dim": 4, "v_dim": 4, "has_gate": False, "has_beta": False}
    slot_of, memories = routing(3, True)
    x = torch.randn(N, 8)
    with pytest.raises(ValueError, match="project takes"):
        project(x, torch.randn(H * unit_width(4, 4, False, False, MT, True) - 1, 8), slot_of, memories, **dims,
                num_memories=MT, shared=True)


@pytest.mark.parametrize("bound", [1, 80, 256, 257, 2**15, 2**15 + 1])
def test_stable_sort_small_equals_torch_sort(bound):
    """Routing keys sort in their narrowest dtype (uint8 up to 256 values, int16, int32) with torch's stable order,
    the bounds of each dtype included; the sorted keys keep the input's dtype."""
    g = torch.Generator().manual_seed(bound)
    key = torch.cat([torch.randint(0, bound, (3000,), generator=g), torch.tensor([0, bound - 1])])
    values, order = stable_sort_small(key, bound)
    ref = torch.sort(key, stable=True)
    assert values.dtype == key.dtype
    assert torch.equal(values, ref.values) and torch.equal(order, ref.indices)


@pytest.mark.gpu
def test_gpu_bf16_full_shape():
    """bf16 at MoM's benchmark size (32768 tokens, top-2 of 4 + shared, 4 heads x 256, hidden 2048), memory 0 chosen
    by no token, the router on the dense GEMM: the grouped GEMM path against the fp32 every-memory definition (router
    logits by F.linear), pieces and every gradient."""
    # this test is about the grouped path; elsewhere the layer takes the dense fallback, which the CPU tests cover
    if not mom_dispatch.grouped_gemm_ok(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("torch's grouped GEMM needs bf16 on sm90 / sm100 and torch >= 2.10")
    torch.manual_seed(0)
    Ntok, H4, K, V, M, h = 32768, 4, 256, 256, 4, 2048
    dims = {"heads": H4, "k_dim": K, "v_dim": V, "has_gate": True, "has_beta": True}
    memories = torch.rand(Ntok, M - 1, device="cuda").argsort(-1)[:, :2] + 1
    memories = torch.cat([memories, torch.full((Ntok, 1), M, device="cuda")], 1)
    slot_of = torch.randperm(Ntok * 3, device="cuda").view(Ntok, 3)
    x = torch.randn(Ntok, h, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(H4 * unit_width(K, V, True, True, M, True), h, device="cuda") * h ** -0.5).bfloat16()
    router_w = (torch.randn(M, h, device="cuda") * h ** -0.5).bfloat16()

    def ours(x, w, r):
        with torch.no_grad():  # the routing logits: their gradient comes through the projection
            logits = torch.mm(x, r.t(), out_dtype=torch.float32)
        return project(x, w, slot_of, memories, **dims, num_memories=M, shared=True, router=(r, logits))

    def reference(x, w, r):
        return project_reference(x, w, slot_of, memories, dims, M, True)._replace(logits=F.linear(x, r))

    res = []
    for fn, args in ((ours, (x, weight, router_w)), (reference, (x.float(), weight.float(), router_w.float()))):
        leaves = [t.clone().requires_grad_() for t in args]
        out = fn(*leaves)
        torch.manual_seed(1)
        sum((t.float() * torch.randn(t.shape, device="cuda").bfloat16().float()).sum() for t in out
            if t is not None).backward()
        res.append(([t.float() for t in out if t is not None], [t.grad.float() for t in leaves]))
    (got, dgot), (ref, dref) = res
    for i, (t, r) in enumerate(zip(got, ref, strict=True)):
        assert rel(t, r) < 1e-2, (i, rel(t, r))
    for name, t, r in zip(("x", "weight", "router"), dgot, dref, strict=True):
        assert rel(t, r) < 1e-2, (name, rel(t, r))
    assert torch.count_nonzero(dgot[1].view(H4, -1, h)[:, K + V:K + V + K + V + 2]) == 0
