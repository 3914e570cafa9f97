"""MoM's fused dispatch (Triton under the interpreter on CPU) equals its definition: every output, and the input
gradient for random gradients of every output (or of some, the others unused), k' = 1..3, with and without the output
gate and beta, K / V powers of two or not. Outputs and the input gradient are poisoned with NaN, so an element the
kernels leave unwritten fails."""
from __future__ import annotations

import pytest
import torch
from linear_moe.kernels.mom_dispatch import dispatch, naive_dispatch

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


def routing(kp):
    """Distinct memories per token and a random slot permutation."""
    memories = torch.stack([torch.randperm(MT)[:kp] for _ in range(N)])
    return torch.randperm(N * kp).view(N, kp), memories


def run(x, slot_of, memories, grads, dims, backend, used):
    xx = x.clone().requires_grad_()
    out = dispatch(xx, slot_of, memories, **dims, backend=backend)
    loss = sum((t.float() * grads[i]).sum() for i, t in enumerate(out) if t is not None and i in used)
    loss.backward()
    return out, xx.grad


@pytest.mark.parametrize("kp,K,V,gate,beta", [(1, 16, 32, True, True), (2, 16, 32, False, False),
                                              (3, 12, 20, True, False), (3, 16, 32, False, True)],
                         ids=["k1-K16-V32-gate-beta", "k2-K16-V32", "k3-K12-V20-gate", "k3-K16-V32-beta"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_triton_equals_definition(kp, K, V, gate, beta, dtype, tol, poisoned_empty):
    torch.manual_seed(0)
    dims = {"heads": H, "k_dim": K, "v_dim": V, "num_memories": MT, "has_gate": gate, "has_beta": beta}
    unit = K + (V if gate else 0) + MT * (K + V + 1 + beta)
    slot_of, memories = routing(kp)
    x = torch.randn(N, H * unit, dtype=dtype)
    ref = naive_dispatch(x.float(), slot_of, memories, **dims)
    # gradients representable in x's dtype, so the copied ones can be compared exactly
    grads = [None if t is None else torch.randn_like(t).to(dtype).float() for t in ref]
    # every output's gradient, then only q's, k's and v's (the others arrive as None and count as zeros)
    for used in ({0, 1, 2, 3, 4, 5}, {1, 2, 3}):
        got, dx = run(x, slot_of, memories, grads, dims, "triton", used)
        _, dx_ref = run(x.float(), slot_of, memories, grads, dims, "torch", used)
        for name, t, r in zip(got._fields, got, ref, strict=True):
            assert (t is None) == (r is None), name
            if t is not None:
                assert t.dtype == dtype and t.is_contiguous(), name
                assert torch.equal(t.float(), r), name  # copies: exact
        assert dx.shape == x.shape and dx.dtype == dtype
        dx, dx_ref = dx.view(N, H, unit), dx_ref.view(N, H, unit)
        # gate and memory columns are copies; q's gradient is a sum of k' slot gradients (fp32, then x's dtype)
        assert torch.equal(dx[..., K:].float(), dx_ref[..., K:]), used
        assert rel(dx[..., :K], dx_ref[..., :K]) < tol, (used, rel(dx[..., :K], dx_ref[..., :K]))


def test_unit_shaped_input(poisoned_empty):
    """x as [N, H, unit] (the layer's view) gives the same pieces, and its gradient comes back in that shape."""
    torch.manual_seed(0)
    dims = {"heads": H, "k_dim": 8, "v_dim": 8, "num_memories": MT, "has_gate": True, "has_beta": True}
    slot_of, memories = routing(2)
    x = torch.randn(N, H, 8 + 8 + MT * 18)
    ref = naive_dispatch(x, slot_of, memories, **dims)
    grads = [torch.randn_like(t) for t in ref]
    got, dx = run(x, slot_of, memories, grads, dims, "triton", {0, 1, 2, 3, 4, 5})
    _, dx_ref = run(x, slot_of, memories, grads, dims, "torch", {0, 1, 2, 3, 4, 5})
    assert all(torch.equal(t, r) for t, r in zip(got, ref, strict=True))
    assert dx.shape == x.shape and rel(dx, dx_ref) < 1e-6


def test_bad_shapes():
    dims = {"heads": 2, "k_dim": 4, "v_dim": 4, "num_memories": 2, "has_gate": False, "has_beta": False}
    slot_of, memories = torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="dispatch takes"):
        dispatch(torch.randn(3, 2 * 20), slot_of, memories, **dims)  # unit is 4 + 2 * 9 = 22, not 20
    with pytest.raises(ValueError, match="dispatch takes"):
        dispatch(torch.randn(3, 2 * 22), slot_of, memories[:, :1], **dims)


@pytest.mark.gpu
def test_gpu_bf16_full_shape():
    """bf16 at MoM's benchmark size (32768 tokens, top-2 + shared of 5 memories, 4 heads x 256) against the fp32
    definition: the pieces and the gradient's copied columns exactly, q's gradient (a sum of 3) to bf16 rounding."""
    torch.manual_seed(0)
    N, kp, H, K, V, MT = 32768, 3, 4, 256, 256, 5
    dims = {"heads": H, "k_dim": K, "v_dim": V, "num_memories": MT, "has_gate": True, "has_beta": True}
    unit = K + V + MT * (K + V + 2)
    slot_of = torch.randperm(N * kp, device="cuda").view(N, kp)
    memories = torch.rand(N, MT, device="cuda").argsort(-1)[:, :kp]
    x = torch.randn(N, H * unit, device="cuda", dtype=torch.bfloat16)
    res = []
    for xi, backend in ((x, "triton"), (x.float(), "torch")):
        xx = xi.clone().requires_grad_()
        out = dispatch(xx, slot_of, memories, **dims, backend=backend)
        torch.manual_seed(1)
        sum((t.float() * torch.randn(t.shape, device="cuda").bfloat16().float()).sum() for t in out).backward()
        res.append(([t.float() for t in out], xx.grad.float().view(N, H, unit)))
    (got, dx), (ref, dx_ref) = res
    for t, r in zip(got, ref, strict=True):
        assert torch.equal(t, r)
    assert torch.equal(dx[..., K:], dx_ref[..., K:])
    assert rel(dx[..., :K], dx_ref[..., :K]) < 1e-2
