"""Fused row-wise norms (l2norm, gated RMSNorm) against their torch definitions: output and every gradient (dx,
dweight, dgate), contiguous and strided inputs (a head split of a projection read in place, and layouts that need a
copy), per-head and shared weights, a non-power-of-two head dim."""
import linear_moe.kernels.norms as norms_mod
import pytest
import torch
from linear_moe.kernels.delta_rule.naive import l2norm as delta_rule_l2norm
from linear_moe.kernels.norms import gated_rmsnorm, l2norm, torch_gated_rmsnorm, torch_l2norm

from linear_moe.modules.gated_norm import GatedRMSNorm

# the interpreter's fp32 math rounds like torch's up to reduction order (errors ~2e-7); fp16 results are the same fp32
# values rounded once, a few elements land one ulp apart (dx ~1e-4)
TOL = {torch.float32: 1e-6, torch.float16: 3e-4}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LAYOUTS = ("contig", "split", "transposed", "strided")
B, T = 2, 7


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """NaN-poisoned buffers, and tiles of a few rows so that every kernel masks a partial tile and the gated
    backward loops over several tiles per program."""
    monkeypatch.setattr(norms_mod, "DEBUG_POISON", True)
    monkeypatch.setitem(norms_mod.LAUNCH, "tile", 256)
    monkeypatch.setitem(norms_mod.LAUNCH, "bwd_programs_per_sm", 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_views(layout: str, H: int, D: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A leaf and n [B, T, H, D] views of it: contiguous slices, head splits of one projection [B, T, P] (strided
    rows, read in place), transposed leading dims, or a last dim of stride 2 (both copied by the kernels)."""
    HD = H * D
    if layout == "contig":
        leaf = torch.randn(n, B, T, H, D)
    elif layout == "split":
        leaf = torch.randn(B, T, n * HD + 3)
    elif layout == "transposed":
        leaf = torch.randn(n, T, B, H, D)
    else:
        leaf = torch.randn(n, B, T, H, 2 * D)
    leaf = leaf.to(dtype).requires_grad_()
    if layout == "contig":
        views = [leaf[i] for i in range(n)]
    elif layout == "split":
        views = [leaf[..., 3 + i * HD:3 + (i + 1) * HD].view(B, T, H, D) for i in range(n)]
    elif layout == "transposed":
        views = [leaf[i].transpose(0, 1) for i in range(n)]
    else:
        views = [leaf[i][..., ::2] for i in range(n)]
    return leaf, views


def grads(y: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(y.shape, generator=gen).to(y.dtype)
    return list(torch.autograd.grad(y, inputs, dy))


def check(got: dict, ref: dict, tol: float) -> None:
    for n, t in got.items():
        assert t.shape == ref[n].shape and t.dtype == ref[n].dtype, (n, t.shape, ref[n].shape, t.dtype, ref[n].dtype)
        assert torch.isfinite(t).all(), n
    errs = {n: rel(got[n], ref[n]) for n in ref}
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


def run_l2norm(fn, layout, H, D, dtype, **kw):
    torch.manual_seed(0)
    _, (x,) = make_views(layout, H, D, 1, dtype)
    y = fn(x, **kw)
    (dx,) = grads(y, [x])
    return {"y": y, "dx": dx}


def run_gated(fn, layout, H, D, dtype, gated, headwise, **kw):
    torch.manual_seed(0)
    _, views = make_views(layout, H, D, 2 if gated else 1, dtype)
    x, gate = views[0], (views[1] if gated else None)
    # weight in fp32, as a module's parameter is next to fp16 activations
    w = (1.0 + 0.5 * torch.randn((H, D) if headwise else (D,))).requires_grad_()
    y = fn(x, w, gate, **kw)
    inputs = [x, w] + ([gate] if gated else [])
    got = dict(zip(("dx", "dweight", "dgate"), grads(y, inputs)))
    return {"y": y, **got}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("H,D", [(1, 16), (3, 64), (3, 100), (1, 100)], ids=lambda v: str(v))
def test_l2norm(H, D, layout, dtype):
    ref = run_l2norm(torch_l2norm, layout, H, D, dtype)
    check(run_l2norm(l2norm, layout, H, D, dtype, backend="triton"), ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("H,D,headwise", [(1, 16, True), (3, 64, True), (3, 100, True), (3, 16, False), (1, 100, False)],
                         ids=lambda v: str(v))
def test_gated_rmsnorm(H, D, headwise, gated, layout, dtype):
    ref = run_gated(torch_gated_rmsnorm, layout, H, D, dtype, gated, headwise)
    check(run_gated(gated_rmsnorm, layout, H, D, dtype, gated, headwise, backend="triton"), ref, TOL[dtype])


def test_default_launch_settings(monkeypatch):
    """The shipped tile sizes (many rows per tile, one program per tile in the backward) on a larger odd shape."""
    monkeypatch.setattr(norms_mod, "LAUNCH", {"tile": 2048, "warps": 4, "bwd_programs_per_sm": 8})
    torch.manual_seed(0)
    x = torch.randn(2, 133, 4, 64)
    gate = torch.randn(2, 133, 4, 64)
    w = torch.randn(4, 64)
    for fn, args in ((l2norm, (x,)), (gated_rmsnorm, (x, w, gate))):
        leaves = [a.clone().requires_grad_() for a in args]
        y = fn(*leaves, backend="triton")
        got = [y, *grads(y, leaves)]
        ref_fn = torch_l2norm if fn is l2norm else torch_gated_rmsnorm
        leaves = [a.clone().requires_grad_() for a in args]
        y = ref_fn(*leaves)
        ref = [y, *grads(y, leaves)]
        check(dict(enumerate(got)), dict(enumerate(ref)), TOL[torch.float32])


@pytest.mark.parametrize("shape", [(24,), (5, 24), (2, 3, 24)], ids=str)
def test_shared_weight_any_rank(shape):
    x, gate, w = torch.randn(shape), torch.randn(shape), torch.randn(24)
    got, ref = ([x.clone().requires_grad_(), w.clone().requires_grad_(), gate.clone().requires_grad_()] for _ in "ab")
    y = gated_rmsnorm(*got, backend="triton")
    y_ref = torch_gated_rmsnorm(*ref)
    check({"y": y, **dict(enumerate(grads(y, got)))}, {"y": y_ref, **dict(enumerate(grads(y_ref, ref)))}, 1e-6)


def test_head_split_is_read_in_place():
    """A head split of a projection becomes an [M, H, D] view of the same memory, not a copy."""
    _, (x,) = make_views("split", 3, 16, 1, torch.float32)
    x3 = norms_mod._as_rows(x, (1, 3))
    assert x3.data_ptr() == x.data_ptr() and x3.stride() == (x.stride(1), 16, 1)
    _, (x,) = make_views("transposed", 3, 16, 1, torch.float32)
    assert norms_mod._as_rows(x, (1, 3)).is_contiguous()


def test_references_match_the_modules():
    """The torch definitions here are, op for op, delta_rule's l2norm and (Headwise)GatedRMSNorm."""
    x = torch.randn(2, 5, 3, 32, dtype=torch.float16)
    assert torch.equal(torch_l2norm(x), delta_rule_l2norm(x))
    gate = torch.randn(2, 5, 3, 32)
    for shape in ((32,), (3, 32)):
        m = GatedRMSNorm(32)
        m.weight = torch.nn.Parameter(torch.randn(shape))
        assert torch.equal(torch_gated_rmsnorm(x, m.weight, gate), m(x, gate))
        assert torch.equal(torch_gated_rmsnorm(x, m.weight), m(x))


def test_cpu_dispatch_is_torch():
    x, w, gate = torch.randn(4, 2, 8), torch.randn(2, 8), torch.randn(4, 2, 8)
    assert torch.equal(l2norm(x), torch_l2norm(x))
    assert torch.equal(gated_rmsnorm(x, w, gate), torch_gated_rmsnorm(x, w, gate))
    empty = torch.randn(0, 2, 8)
    assert l2norm(empty, backend="triton").shape == empty.shape
    assert gated_rmsnorm(empty, w, backend="triton").shape == empty.shape


@pytest.mark.parametrize("call,match", [
    (lambda: gated_rmsnorm(torch.randn(4, 2, 8), torch.randn(3, 8)), "weight"),
    (lambda: gated_rmsnorm(torch.randn(4, 2, 8), torch.randn(7)), "weight"),
    (lambda: gated_rmsnorm(torch.randn(4, 2, 8), torch.randn(8), torch.randn(4, 8)), "gate"),
    (lambda: gated_rmsnorm(torch.randn(4, 2, 8), torch.randn(8).double()), "weight.dtype"),
    (lambda: l2norm(torch.randint(0, 3, (4, 8))), "x.dtype"),
    (lambda: l2norm(torch.randn(2, 2048), backend="triton"), "limit"),
    (lambda: l2norm(torch.randn(2, 8), backend="cuda"), "backend"),
], ids=["weight-heads", "weight-dim", "gate-shape", "weight-dtype", "x-dtype", "D-limit", "backend"])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# bf16 at a layer's shape vs the fp32 definition on the same bf16-rounded inputs. Every result is one bf16 rounding of
# an fp32 value (relative norm error ~1.1e-3 for uniformly spread rounding errors): the bound is 4e-3 and at most twice
# the torch bf16 path's own error (its error as measured here, plus 1e-5 for reduction order).
GPU_TOL = 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["l2norm", "gated_rmsnorm"])
def test_gpu_bf16_layer_shape(op):
    M, H, D = 32768, 4, 256
    proj = torch.randn(M, 2 * H * D + 64, device="cuda").bfloat16()
    w = (1.0 + 0.5 * torch.randn(H, D, device="cuda")).bfloat16()
    dy = torch.randn(M, H, D, device="cuda").bfloat16()

    def run(fn, dtype, **kw):
        leaf = proj.to(dtype).detach().requires_grad_()
        # x and gate are head splits of one projection, read in place by the kernels
        x, gate = (leaf[:, 64 + i * H * D:64 + (i + 1) * H * D].view(M, H, D) for i in range(2))
        xs = [x] if op == "l2norm" else [x, w.to(dtype).detach().requires_grad_(), gate]
        y = fn(*xs, **kw)
        names = ("dx",) if op == "l2norm" else ("dx", "dweight", "dgate")
        return {"y": y, **dict(zip(names, torch.autograd.grad(y, xs, dy.to(dtype))))}

    torch_fn, fn = (torch_l2norm, l2norm) if op == "l2norm" else (torch_gated_rmsnorm, gated_rmsnorm)
    ref = run(torch_fn, torch.float32)
    base = run(torch_fn, torch.bfloat16)
    got = run(fn, torch.bfloat16, backend="triton")
    errs = {n: (rel(got[n], ref[n]), rel(base[n], ref[n])) for n in ref}
    bad = {n: e for n, e in errs.items() if not (e[0] <= GPU_TOL and e[0] <= 2 * e[1] + 1e-5)}
    assert not bad, f"(triton, torch bf16) relative errors out of bounds: {bad} (all: {errs})"
