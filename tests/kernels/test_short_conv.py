"""The Triton short conv (under the interpreter on CPU) equals the per-segment F.conv1d definition: output, dx and dw,
for dense rows, packed segments (zero-length ones too, segments shorter than the kernel) and strided [B, T, U, D] views
read in place, with and without the fused per-unit L2 norm, under the default launch and under small ones whose token
steps and channel tiles cut across segments, units and T; the module's torch path (one conv plus segment-start fix-up)
equals it too."""
from __future__ import annotations

import pytest
import torch
from linear_moe.kernels import short_conv as conv_mod
from linear_moe.kernels.short_conv import naive_short_conv, short_conv

from linear_moe.modules.short_conv import ShortConvolution


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _grads(fn, x, w, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


CASES = {
    "dense": (3, 70, None),
    "packed": (1, 70, [0, 0, 2, 3, 40, 40, 70]),
    "one-token": (1, 1, [0, 1]),
}


@pytest.mark.parametrize("norm", [None, 1e-6], ids=["", "l2norm"])
@pytest.mark.parametrize("act", ["silu", None], ids=["silu", "linear"])
@pytest.mark.parametrize("view", [False, True], ids=["contiguous", "strided-view"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)], ids=["fp32", "fp16"])
def test_triton_equals_definition(case, view, act, norm, dtype, tol):
    """With the norm, each of the U units of D channels is normalised (the contiguous [B, T, U * D] input is one
    unit of U * D)."""
    B, T, cu = CASES[case]
    U, D, W = 3, 48, 4
    torch.manual_seed(0)
    cu = torch.tensor(cu) if cu is not None else None
    full = torch.randn(B, T, U, D + 5, dtype=dtype)  # 5 extra columns per unit: a strided view, as MoM/in_proj give
    x = full[..., :D] if view else full[..., :D].reshape(B, T, U * D).contiguous()
    w = torch.randn(U * D, W) * 0.5
    dy = torch.randn(B, T, U * D, dtype=dtype)
    ref = _grads(lambda a, b: naive_short_conv(a.float(), b, cu_seqlens=cu, activation=act, l2norm_eps=norm),
                 x, w, dy.float())
    got = _grads(lambda a, b: short_conv(a, b, cu_seqlens=cu, activation=act, l2norm_eps=norm, backend="triton"),
                 x, w, dy)
    for name, g, r in zip(("y", "dx", "dw"), got, ref):
        assert g.shape == (r.shape if name != "dx" else x.shape), name
        assert rel(g.reshape(r.shape), r) < tol, (name, rel(g.reshape(r.shape), r))


# (BT, BC, warps, steps) per kernel: "tiny" has 4-row steps, 3 steps a program and 16-channel tiles (two per 24-wide
# unit, the second half masked), so a step spans several segments and a program ends mid-T; "wide" asks for
# 64-channel tiles, which the launch clamps to the unit's power of two (32, still wider than the 24-wide unit), and
# one step a program
LAUNCHES = {"tiny": {"fwd": (4, 16, 1, 3), "dact": (4, 16, 1, 3), "dx": (4, 16, 1, 2), "fwd_norm": (4, 0, 1, 3),
                     "dact_norm": (2, 0, 1, 3)},
            "wide": {"fwd": (8, 64, 2, 1), "dact": (16, 64, 2, 1), "dx": (8, 64, 2, 1), "fwd_norm": (16, 0, 2, 1),
                     "dact_norm": (8, 0, 2, 2)}}
EDGE_CASES = {"dense-B2-T37": (2, 37, None), "packed-T37": (1, 37, [0, 0, 1, 3, 9, 9, 10, 30, 37])}


@pytest.mark.parametrize("act,norm", [("silu", None), (None, None), ("silu", 1e-6)], ids=["silu", "linear", "l2norm"])
@pytest.mark.parametrize("W,pad", [(4, 5), (3, 2), (4, 8)], ids=["W4-align1", "W3-align2", "W4-align8"])
@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_launch_edges(monkeypatch, launch, case, W, pad, act, norm):
    """Small launch settings on a strided view whose unit stride D + pad has power-of-two factor 1, 2 or 8 (the
    alignment the kernel passes to Triton), W = 3 (taps padded to 4 in the dw tile), fp32 against the definition;
    the norm's tile is the 24-wide unit padded to 32."""
    monkeypatch.setattr(conv_mod, "LAUNCH", LAUNCHES[launch])
    B, T, cu = EDGE_CASES[case]
    U, D = 2, 24
    cu = torch.tensor(cu) if cu is not None else None
    x = torch.randn(B, T, U, D + pad)[..., :D]
    w = torch.randn(U * D, W) * 0.5
    dy = torch.randn(B, T, U * D)
    ref = _grads(lambda a, b: naive_short_conv(a, b, cu_seqlens=cu, activation=act, l2norm_eps=norm), x, w, dy)
    got = _grads(lambda a, b: short_conv(a, b, cu_seqlens=cu, activation=act, l2norm_eps=norm, backend="triton"),
                 x, w, dy)
    for name, g, r in zip(("y", "dx", "dw"), got, ref, strict=True):
        assert rel(g.reshape(r.shape), r) < 1e-5, (name, rel(g.reshape(r.shape), r))


def test_module_torch_path_equals_definition():
    torch.manual_seed(0)
    conv = ShortConvolution(24, 4)
    x = torch.randn(1, 50, 24)
    cu = torch.tensor([0, 3, 3, 20, 50])
    y, _ = conv(x, cu_seqlens=cu)
    assert rel(y, naive_short_conv(x, conv.weight, cu_seqlens=cu)) < 1e-6


def test_bad_inputs():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="weight"):
        short_conv(x, torch.randn(7, 4))
    with pytest.raises(ValueError, match="packed"):
        short_conv(x, torch.randn(8, 4), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="unit stride"):
        short_conv(x.transpose(1, 2), torch.randn(5, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("packed,D,norm", [(False, 768, None), (True, 768, None), (True, 256, 1e-6)],
                         ids=["B8-T2048", "packed", "packed-l2norm-D256"])
def test_gpu_bf16_full_shape(packed, D, norm):
    """bf16 on the GPU against the fp32 definition on the same bf16 inputs: y, dx and dw within 1e-2 relative
    (bf16 output rounding is 4e-3); with the norm, units of 256 channels as MoM's q and k."""
    torch.manual_seed(0)
    B, T, U = (1, 16384, 4) if packed else (8, 2048, 4)
    cu = torch.tensor([0, 1, 1, 5000, 5003, 16384], device="cuda") if packed else None
    full = torch.randn(B, T, U, D + 258, device="cuda", dtype=torch.bfloat16)
    x = full[..., :D]
    w = torch.randn(U * D, 4, device="cuda") * 0.5
    dy = torch.randn(B, T, U * D, device="cuda", dtype=torch.bfloat16)
    ref = _grads(lambda a, b: naive_short_conv(a.float(), b, cu_seqlens=cu, l2norm_eps=norm), x, w, dy.float())
    got = _grads(lambda a, b: short_conv(a, b, cu_seqlens=cu, l2norm_eps=norm), x, w, dy)
    for name, g, r in zip(("y", "dx", "dw"), got, ref, strict=True):
        assert rel(g.reshape(r.shape).float(), r) < 1e-2, (name, rel(g.reshape(r.shape).float(), r))
