"""MoM's fused combine (Triton under the interpreter on CPU) equals its definition: output, slot and weight gradients,
for every slot-permutation layout the dispatch produces (k' = 1..3, D not a power of two, above one block)."""
from __future__ import annotations

import pytest
import torch
from linear_moe.kernels.mom_combine import combine, naive_combine


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kp,D", [(1, 16), (3, 100), (2, 1500)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_triton_equals_definition(kp, D, dtype, tol):
    torch.manual_seed(0)
    N = 37
    slot_of = torch.randperm(N * kp).view(N, kp)
    o = torch.randn(N * kp, D, dtype=dtype)
    w = torch.rand(N, kp)
    dout = torch.randn(N, D, dtype=dtype)
    res = []
    for backend in ("torch", "triton"):
        oo, ww = o.clone().requires_grad_(), w.clone().requires_grad_()
        out = combine(oo if backend == "triton" else oo.float(), ww, slot_of, backend=backend)
        out.backward(dout.to(out.dtype))
        res.append((out, oo.grad, ww.grad))
    for name, got, ref in zip(("out", "do", "dw"), res[1], res[0]):
        assert got.shape == ref.shape, name
        assert rel(got, ref) < tol, (name, rel(got, ref))
    assert torch.equal(naive_combine(o, w, slot_of), combine(o, w, slot_of))


def test_bad_shapes():
    with pytest.raises(ValueError, match="combine"):
        combine(torch.randn(4, 3), torch.rand(2, 2), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.gpu
def test_gpu_bf16_full_shape():
    """bf16 at MoM's benchmark size (32768 tokens, top-2 + shared, 4 heads x 256) against the fp32 definition."""
    torch.manual_seed(0)
    N, kp, D = 32768, 3, 1024
    slot_of = torch.randperm(N * kp, device="cuda").view(N, kp)
    o = torch.randn(N * kp, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(N, kp, device="cuda")
    dout = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    res = []
    for x in (o, o.float()):
        oo, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = combine(oo, ww, slot_of, backend="triton" if x.dtype == torch.bfloat16 else "torch")
        out.backward(dout.to(out.dtype))
        res.append((out.float(), oo.grad.float(), ww.grad))
    for name, got, ref in zip(("out", "do", "dw"), res[0], res[1], strict=True):
        assert rel(got, ref) < 1e-2, (name, rel(got, ref))
