"""Delta rule kernels (DeltaNet, gated DeltaNet) against the step-by-step fp32 definition: output, final state and
every gradient (q, k, v, beta, g, initial state), dense and varlen (with a zero-length segment)."""
import linear_moe.kernels.delta_rule.chunk as chunk_mod
import pytest
import torch
import torch.nn.functional as F
from linear_moe.kernels.delta_rule import (
    chunk_delta_rule,
    fused_recurrent_delta_rule,
    naive_recurrent_delta_rule,
    torch_chunk_delta_rule,
)

NAMES = ("o", "ht", "dq", "dk", "dv", "dbeta", "dg", "dh0")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(chunk_mod, "DEBUG_POISON", True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, K, V, gated, dtype=torch.float32, device="cpu", N=None):
    q = torch.randn(B, T, H, K, device=device)
    # unit-norm keys keep the recurrence contractive, as the mixers' l2norm does
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    v = torch.randn(B, T, H, V, device=device)
    beta = torch.rand(B, T, H, device=device).sigmoid()
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + 2.0) if gated else None
    h0 = torch.randn(N or B, H, K, V, device=device) * 0.5
    return [q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype), g, h0]


def run(fn, inputs, **kw):
    """Forward with a final state, backward with random cotangents on o and the state; returns dict of results."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    q, k, v, beta, g, h0 = leaves
    o, ht = fn(q, k, v, beta, g, initial_state=h0, output_final_state=True, **kw)
    gen = torch.Generator(device="cpu").manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
    dht = torch.randn(ht.shape, generator=gen).to(ht.device, ht.dtype)
    ((o.float() * do.float()).sum() + (ht * dht).sum()).backward()
    out = {"o": o, "ht": ht}
    for name, x in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), leaves):
        if x is not None:
            out[name] = x.grad
    return out


def compare(got, ref, tol, skip=()):
    errs = {n: rel(got[n], ref[n]) for n in NAMES if n in ref and n not in skip}
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    return errs


def _id(B, T, H, D, dt):
    return f"B{B}-T{T}-H{H}-D{D}-{dt}"


# (B, T, H, K, V): odd T, exactly one chunk, one past a chunk; T=1000 only with tiny dims (interpreter cost)
SHAPES = [(2, 1, 2, 32, 32), (2, 63, 2, 32, 32), (1, 64, 2, 32, 16), (2, 65, 1, 16, 32), (1, 1000, 1, 16, 16)]
SHAPE_IDS = [_id(B, T, H, K, "fp32") for B, T, H, K, V in SHAPES]


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("l2", [False, True], ids=["", "l2"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_torch_chunk_vs_naive(shape, gated, l2):
    B, T, H, K, V = shape
    inputs = make_inputs(B, T, H, K, V, gated)
    ref = run(naive_recurrent_delta_rule, inputs, use_qk_l2norm=l2)
    compare(run(torch_chunk_delta_rule, inputs, use_qk_l2norm=l2), ref, 1e-5)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_chunk_triton_vs_naive(shape, gated):
    B, T, H, K, V = shape
    inputs = make_inputs(B, T, H, K, V, gated)
    ref = run(naive_recurrent_delta_rule, inputs)
    compare(run(chunk_delta_rule, inputs, backend="triton", block_k=16, block_v=16), ref, 1e-5)


@pytest.mark.parametrize(
    "blocks", [(16, 16, 16), (32, 32, 16), (64, 32, 32)], ids=lambda b: "BT{}-BK{}-BV{}".format(*b)
)
def test_chunk_triton_blocks_l2norm(blocks):
    BT, BK, BV = blocks
    inputs = make_inputs(1, 70, 1, 32, 16, True)
    ref = run(naive_recurrent_delta_rule, inputs, use_qk_l2norm=True)
    got = run(chunk_delta_rule, inputs, backend="triton", use_qk_l2norm=True, chunk_size=BT, block_k=BK, block_v=BV)
    compare(got, ref, 1e-5)


@pytest.mark.parametrize("heads_per_group", [1, 2, 4])
def test_chunk_triton_state_head_groups(monkeypatch, heads_per_group):
    """The backward's state kernels run per head group (1, 2 or all 4 heads at a time; on a GPU the group size follows
    from the SM count): every group's h, dh and gradients land on their own heads."""
    B, T, H, K, V = 2, 70, 4, 32, 16
    # programs per head in a state-kernel launch: N sequences x V-blocks (block_v 16 -> 1); on CPU one "SM"
    monkeypatch.setattr(chunk_mod, "STATE_GROUP_PROGRAMS_PER_SM", B * heads_per_group)
    inputs = make_inputs(B, T, H, K, V, True)
    q = inputs[0]
    d = chunk_mod._dims(q.reshape(1, B * T, H, K), inputs[2].reshape(1, B * T, H, V),
                        torch.tensor([0, T, 2 * T]), 64, 16, 16)
    assert chunk_mod._state_heads(d, q.device, 16) == heads_per_group
    ref = run(naive_recurrent_delta_rule, inputs)
    compare(run(chunk_delta_rule, inputs, backend="triton", block_k=16, block_v=16), ref, 1e-5)


@pytest.mark.parametrize("rows,dtype,delta,h,dh,recompute", [
    (64, torch.bfloat16, True, (64, 2), (32, 1), False),   # B16 x H4: programs for every SM at the widest options
    (16, torch.bfloat16, True, (32, 2), (32, 2), True),    # B4 x H4: too few programs, the fallbacks (dh recomputes)
    (16, torch.float32, True, (32, 1), (32, 1), False),    # fp32 tiles: one stage, so dh reads the scores
    (64, torch.bfloat16, False, (64, 2), (32, 2), True),   # no delta correction: dh always takes the last option
])
def test_state_launch_rule(monkeypatch, rows, dtype, delta, h, dh, recompute):
    """The state kernels' (V-block, stages) at K = V = 256 on a 132-SM card: the first STATE_LAUNCH option that gives
    every SM a program, else the last (dh without the delta correction: the last); dh recomputes the forward's scores
    exactly when it runs in two stages."""
    monkeypatch.setattr(chunk_mod, "sm_count", lambda device: 132)
    dev = torch.device("cpu")
    got_h = chunk_mod._state_launch("h", dtype, 256, 64, 256, rows, dev)
    assert (got_h[0], got_h[1]["num_stages"]) == h
    d = chunk_mod._dims(torch.zeros(1, 64, rows // 4, 256), torch.zeros(1, 64, rows // 4, 256),
                        torch.arange(5) * 16, 64, 64, 64)
    bv, launch, recomputes = chunk_mod._dh_launch(d, dtype, dev, delta)
    assert (bv, launch["num_stages"], recomputes) == (*dh, recompute)


@pytest.mark.parametrize("rows,delta,dh", [
    (256, True, (64, 3)),   # B16 x H16: programs for every SM in three stages
    (64, True, (64, 2)),    # B4 x H16: 128 programs, two stages
    (256, False, (64, 2)),  # no delta correction: the last option
])
def test_state_launch_rule_k128(monkeypatch, rows, delta, dh):
    """dh at K = V = 128 on a 132-SM card: three stages where that gives every SM a program (the delta rule only),
    and it never recomputes the forward's scores there."""
    monkeypatch.setattr(chunk_mod, "sm_count", lambda device: 132)
    d = chunk_mod._dims(torch.zeros(1, 64, rows // 4, 128), torch.zeros(1, 64, rows // 4, 128),
                        torch.arange(5) * 16, 64, 64, 64)
    bv, launch, recomputes = chunk_mod._dh_launch(d, torch.bfloat16, torch.device("cpu"), delta)
    assert (bv, launch["num_stages"], recomputes) == (*dh, False)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_chunk_triton_dh_recomputes_scores(monkeypatch, gated):
    """The dh kernel in two stages above DH_RECOMPUTE_ABOVE_K recomputes the forward's q.k scores from its own tiles
    (the H100 path at head dim 256), and the forward then keeps none: every gradient still matches the definition."""
    monkeypatch.setattr(chunk_mod, "DH_RECOMPUTE_ABOVE_K", 0)
    monkeypatch.setitem(chunk_mod.LAUNCH, "dh", (4, 2))  # two stages even for fp32 inputs
    kept = []
    fwd = chunk_mod.chunk_delta_rule_fwd

    def spy(*args, **kw):
        out = fwd(*args, **kw)
        kept.append(out.A)
        return out

    monkeypatch.setattr(chunk_mod, "chunk_delta_rule_fwd", spy)
    inputs = make_inputs(2, 70, 2, 32, 16, gated)
    ref = run(naive_recurrent_delta_rule, inputs)
    compare(run(chunk_delta_rule, inputs, backend="triton", block_k=16, block_v=16), ref, 1e-5)
    assert kept == [None]


FUSED_CASES = [((2, 1, 2, 32, 32), False), ((1, 63, 2, 16, 32), False), ((1, 63, 2, 16, 32), True),
               ((1, 1000, 1, 16, 16), True)]


@pytest.mark.parametrize(
    "shape,gated", FUSED_CASES, ids=[_id(*s[:3], s[3], "fp32") + ("-gated" if gt else "-plain") for s, gt in FUSED_CASES]
)
def test_fused_recurrent_vs_naive(shape, gated):
    B, T, H, K, V = shape
    inputs = make_inputs(B, T, H, K, V, gated)
    ref = run(naive_recurrent_delta_rule, inputs, use_qk_l2norm=True)
    compare(run(fused_recurrent_delta_rule, inputs, backend="triton", use_qk_l2norm=True), ref, 1e-5)


def _varlen_reference(inputs, cu, **kw):
    """Per-sequence loop over the naive definition; gradients through the concatenation."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    q, k, v, beta, g, h0 = leaves
    c = cu.tolist()
    os_, hs = [], []
    for n in range(len(c) - 1):
        s = slice(c[n], c[n + 1])
        o, ht = naive_recurrent_delta_rule(
            q[:, s], k[:, s], v[:, s], beta[:, s], g[:, s] if g is not None else None,
            initial_state=h0[n : n + 1], output_final_state=True, **kw,
        )
        os_.append(o)
        hs.append(ht)
    o, ht = torch.cat(os_, 1), torch.cat(hs, 0)
    gen = torch.Generator(device="cpu").manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
    dht = torch.randn(ht.shape, generator=gen).to(ht.device, ht.dtype)
    ((o * do).sum() + (ht * dht).sum()).backward()
    out = {"o": o, "ht": ht}
    for name, x in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), leaves):
        if x is not None:
            out[name] = x.grad
    return out


@pytest.mark.parametrize("impl", ["chunk", "fused", "torch"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_varlen_zero_length_segment(impl, gated):
    # segments 0 and 4 are empty, 17 ends mid-chunk, 70 spans chunks
    cu = torch.tensor([0, 0, 17, 87, 88, 88, 100], dtype=torch.int64 if impl == "chunk" else torch.int32)
    inputs = make_inputs(1, 100, 1, 16, 32, gated, N=6)
    ref = _varlen_reference(inputs, cu, use_qk_l2norm=True)
    fn = {"chunk": chunk_delta_rule, "fused": fused_recurrent_delta_rule, "torch": torch_chunk_delta_rule}[impl]
    kw = {} if impl == "torch" else {"backend": "triton"}
    if impl == "chunk":
        kw.update(chunk_size=16, block_k=16, block_v=16, check_inputs=False)
    got = run(fn, inputs, cu_seqlens=cu, use_qk_l2norm=True, **kw)
    errs = compare(got, ref, 1e-5)
    # the empty segments pass their initial state through untouched, and get its gradient back unchanged
    assert torch.equal(got["ht"][0], inputs[5][0]) and torch.equal(got["ht"][4], inputs[5][4]), errs


@pytest.mark.parametrize("parts,heads_per_group", [(2, 2), (3, 1)])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_chunk_triton_time_parts(monkeypatch, parts, heads_per_group, gated):
    """The backward in time parts (and head groups within each): every sequence's chunks split into `parts` runs,
    the last run first, each starting from the state the forward kept and handing the gradient at its start to the
    run before it. Segments of 0, 1, 2, 4 and 5 chunks, so some parts hold no chunk."""
    monkeypatch.setattr(chunk_mod, "STATE_TIME_PARTS", parts)
    monkeypatch.setattr(chunk_mod, "STATE_GROUP_PROGRAMS_PER_SM", 6 * heads_per_group)
    kept = []
    fwd = chunk_mod.chunk_delta_rule_fwd

    def spy(*args, **kw):
        out = fwd(*args, **kw)
        kept.append(out.mid.shape)
        return out

    monkeypatch.setattr(chunk_mod, "chunk_delta_rule_fwd", spy)
    cu = torch.tensor([0, 0, 17, 87, 88, 88, 150])
    inputs = make_inputs(1, 150, 2, 16, 16, gated, N=6)
    ref = _varlen_reference(inputs, cu, use_qk_l2norm=True)
    got = run(chunk_delta_rule, inputs, cu_seqlens=cu, use_qk_l2norm=True, backend="triton", chunk_size=16,
              block_k=16, block_v=16, check_inputs=False)
    compare(got, ref, 1e-5)
    assert kept == [(parts - 1, 6, 2, 16, 16)]


@pytest.mark.parametrize("segments,heads,D,parts", [
    (20, 4, 256, 2),   # MoM at B4 x T8192: one head group, h and dh 1.5 GiB
    (80, 4, 256, 1),   # MoM at B16 x T2048: two head groups of 0.8 GiB
    (4, 4, 256, 1),    # gated DeltaNet at B4 x T8192
    (20, 16, 128, 2),  # MoM at H16 x D128, B4 x T8192
])
def test_time_parts_rule(monkeypatch, segments, heads, D, parts):
    """Time parts at 98304 bf16 slots on a 132-SM card: as few as keep a head group's h and dh within 1 GiB."""
    monkeypatch.setattr(chunk_mod, "sm_count", lambda device: 132)
    TT = 98304 if segments > 4 else 32768
    k = torch.empty(1, TT, heads, D, device="meta")
    d = chunk_mod._dims(k, k, torch.linspace(0, TT, segments + 1).long(), 64, 64, 64)
    assert chunk_mod._time_parts(d, torch.bfloat16, torch.device("cpu"), True) == parts


def test_dense_tables_match_varlen():
    """A dense batch's tables (built once per shape, no cu_seqlens) list the same chunks as the varlen tables of its
    offsets, without the varlen bound's idle rows; a second call returns the cached tensors."""
    k = torch.zeros(1, 3 * 70, 2, 16)
    dense = chunk_mod._dims(k, k, None, 16, 16, 16, batch=3)
    varlen = chunk_mod._dims(k, k, torch.tensor([0, 70, 140, 210]), 16, 16, 16)
    assert torch.equal(dense.cu, varlen.cu) and torch.equal(dense.cu_chunks, varlen.cu_chunks)
    assert dense.NT == 15 and torch.equal(dense.info, varlen.info[:15]) and bool((varlen.info[15:, 0] == 3).all())
    assert torch.equal(dense.order, varlen.order) and (dense.N, dense.S) == (3, 3)
    assert chunk_mod._dims(k, k, None, 16, 16, 16, batch=3).info is dense.info


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_time_part_tables(parts):
    """A time part's tables: the parts' segments tile every sequence in order, each part's chunk table lists its own
    chunks once (compactly numbered, within its bound NT), and its state programs take its segments only."""
    BT = 16
    cu = torch.tensor([0, 0, 17, 87, 88, 88, 150, 500])
    base = chunk_mod._dims(torch.zeros(1, 500, 2, 16), torch.zeros(1, 500, 2, 16), cu, BT, 16, 16, parts)
    chunks = []
    for p, d in enumerate(chunk_mod._parts(base)):
        assert d.N == 7 * parts and d.S == 7 and d.cu[0] == 0 and d.cu[-1] == 500
        assert torch.equal(d.cu[::parts], cu.int())
        rows = d.info[d.info[:, 0] < d.N]
        assert rows.shape[0] <= d.NT and bool((rows[:, 0] % parts == p).all())
        assert sorted(d.order.tolist()) == list(range(p, 7 * parts, parts))
        # token start of each chunk, in the base numbering
        chunks += [int(d.cu[seg]) + local * BT for seg, local in rows.tolist()]
        assert [int(d.cu_chunks[seg]) + local for seg, local in rows.tolist()] == list(range(rows.shape[0]))
    want = [int(cu[n]) + i * BT for n in range(7) for i in range((int(cu[n + 1] - cu[n]) + BT - 1) // BT)]
    assert sorted(chunks) == want


@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("corr", [0.9, 1.0], ids=["corr0.9", "identical"])
def test_chunk_correlated_keys(chunk, corr):
    """Keys alike within a chunk (what a short conv over similar tokens gives), beta near 1, decay near 0: the
    chunk's (I + A)^-1 is O(1) but powers of A grow like binomial coefficients. The kernel's block inverse must
    stay exact where inverting by powers of A lost every digit (rel ~1e17 before); output, state, every gradient."""
    torch.manual_seed(0)
    q, k, v, beta, g, h0 = make_inputs(1, 130, 2, 32, 32, True)
    base = torch.randn(1, 1, 2, 32)
    k = F.normalize(corr * base + (1 - corr) * torch.randn(1, 130, 2, 32), dim=-1)
    beta, g = torch.full_like(beta, 0.95), torch.full_like(g, -1e-3)
    inputs = [q, k, v, beta, g, h0]
    ref = run(torch_chunk_delta_rule, inputs)
    compare(run(chunk_delta_rule, inputs, backend="triton", chunk_size=chunk), ref, 1e-3)


@pytest.mark.parametrize("cu", [None, [0, 70, 70, 190]], ids=["dense", "varlen"])
def test_chunk_strong_decay_partial_chunk(cu):
    """Decay of 3 per step (what A up to 16 with dt 0.1 and more gives at initialisation): within a chunk the
    cumulative log decay passes -88, where exp overflows fp32. Rows past a sequence's end in its last, partial chunk
    must not meet that overflow (0 * inf = NaN that the tile products then carry into valid rows)."""
    torch.manual_seed(0)
    # 190 = 2 chunks + 62 steps: the last chunk's valid rows reach a cumulative log decay of -186
    q, k, v, beta, g, h0 = make_inputs(1, 190, 2, 32, 32, True)
    g = torch.full_like(g, -3.0)
    inputs = [q, k, v, beta, g, None if cu is not None else h0]
    kw = {} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    ref = run(torch_chunk_delta_rule, inputs, **kw)
    got = run(chunk_delta_rule, inputs, backend="triton", **kw)
    assert all(torch.isfinite(x).all() for x in got.values() if x is not None)
    compare(got, ref, 1e-4)


def test_chunk_fp16():
    inputs = make_inputs(2, 65, 2, 32, 32, True)
    ref = run(naive_recurrent_delta_rule, inputs)
    half = [x.half() if x is not None and i < 4 else x for i, x in enumerate(inputs)]
    # the fp32 reference on fp16-rounded inputs gives torch's own same-dtype error; the kernel stores w, u, h and
    # v_new in fp16, so it may be a few times that: bound at 5x torch's error and 1e-2 outright
    own = run(naive_recurrent_delta_rule, [x.float() if x is not None else None for x in half])
    own_err = {n: rel(own[n], ref[n]) for n in ref}
    got = run(chunk_delta_rule, half, backend="triton", block_k=16, block_v=32)
    errs = compare(got, ref, 1e-2)
    assert all(errs[n] <= max(5 * own_err[n], 2e-3) for n in errs), (errs, own_err)
    assert got["o"].dtype == torch.float16 and got["dq"].dtype == torch.float16


def test_default_backend_on_cpu_is_torch():
    inputs = make_inputs(1, 20, 1, 16, 16, True)
    a = chunk_delta_rule(*inputs[:5], initial_state=inputs[5], output_final_state=True)
    b = torch_chunk_delta_rule(*inputs[:5], initial_state=inputs[5], output_final_state=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("fn", [chunk_delta_rule, fused_recurrent_delta_rule, torch_chunk_delta_rule,
                                naive_recurrent_delta_rule], ids=lambda f: f.__name__)
def test_bad_inputs(fn):
    q, k, v, beta, g, h0 = make_inputs(2, 8, 2, 16, 16, True)
    cases = [
        ((q, k[:, :4], v, beta, g), {}, "same shape"),
        ((q, k, v, beta[..., :1], g), {}, "beta must have shape"),
        ((q, k, v, beta, g[:, :3]), {}, "g must have shape"),
        ((q, k, v.double(), beta, g), {}, "v.dtype"),
        ((q, k, v, beta, g), {"initial_state": h0[:1]}, "initial_state must have shape"),
        ((q, k, v, beta, g), {"cu_seqlens": torch.tensor([0, 8])}, "batch must be 1"),
        ((q[:1], k[:1], v[:1], beta[:1], g[:1]), {"cu_seqlens": torch.tensor([1, 8])}, "start at 0"),
        ((q[:1], k[:1], v[:1], beta[:1], g[:1]), {"cu_seqlens": torch.tensor([0, 5, 3, 8])}, "non-decreasing"),
        ((q[:1], k[:1], v[:1], beta[:1], g[:1]), {"cu_seqlens": torch.tensor([0, 5, 7])}, "end at T"),
        ((q[:1], k[:1], v[:1], beta[:1], g[:1]), {"cu_seqlens": torch.tensor([0.0, 8.0])}, "cu_seqlens.dtype"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn(*args, **kw)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_delta_rule(q, k, v, beta, g, backend="triton", chunk_size=48)


# GPU: bf16 at full shapes against the fp32 reference, block sizes varied (Hopper miscompile guard)

# bf16 inputs and bf16 intermediates (w, u, h, v_new, dv stored in bf16): stated bounds per quantity
GPU_TOL = {"o": 1.5e-2, "ht": 1.5e-2, "dq": 2e-2, "dk": 3e-2, "dv": 2e-2, "dbeta": 3e-2, "dg": 4e-2, "dh0": 2e-2}
GPU_BLOCKS = [(64, 64, 64), (64, 32, 32), (32, 64, 32)]


def _gpu_reference(inputs, **kw):
    # fp32 torch chunk path (TF32 off), itself checked against the naive loop on CPU
    return run(torch_chunk_delta_rule, [x.float() if x is not None else None for x in inputs], **kw)


def _assert_gpu_close(got, ref, tol=None):
    """Every result's relative error against the reference within `tol`, or the bf16 bound GPU_TOL states for it."""
    errs = {n: rel(got[n], ref[n]) for n in ref}
    bad = {n: e for n, e in errs.items() if not e <= (tol or GPU_TOL[n])}
    assert not bad, (bad, errs)


@pytest.mark.gpu
@pytest.mark.parametrize("blocks,gated,heads", [(GPU_BLOCKS[0], False, 4)] + [(b, True, 4) for b in GPU_BLOCKS]
                         + [(GPU_BLOCKS[0], True, 8)],
                         ids=lambda x: "BT{}-BK{}-BV{}".format(*x) if isinstance(x, tuple) else
                         {True: "gated", False: "plain", 4: "H4xD256", 8: "H8xD128"}[x])
def test_gpu_chunk_bf16_full_shape(blocks, gated, heads):
    """B2 x T2048 at H4 x D256 and H8 x D128 (the state kernels' two-stage launch)."""
    BT, BK, BV = blocks
    D = 1024 // heads
    inputs = make_inputs(2, 2048, heads, D, D, gated, dtype=torch.bfloat16, device="cuda")
    ref = _gpu_reference(inputs, use_qk_l2norm=True)
    got = run(chunk_delta_rule, inputs, use_qk_l2norm=True, chunk_size=BT, block_k=BK, block_v=BV)
    _assert_gpu_close(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_chunk_varlen_no_sync(dtype):
    cu = torch.tensor([0, 0, 1000, 1003, 3000, 3000, 4096], device="cuda", dtype=torch.int32)
    inputs = make_inputs(1, 4096, 4, 128, 128, True, dtype=dtype, device="cuda", N=6)
    ref = _gpu_reference(inputs, cu_seqlens=cu, use_qk_l2norm=True)
    chunk_delta_rule(*inputs[:5], initial_state=inputs[5], cu_seqlens=cu, use_qk_l2norm=True, check_inputs=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        o, _ = chunk_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True, cu_seqlens=cu,
                                 use_qk_l2norm=True, check_inputs=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = run(chunk_delta_rule, inputs, cu_seqlens=cu, use_qk_l2norm=True, check_inputs=False)
    _assert_gpu_close(got, ref, 1e-3 if dtype == torch.float32 else None)
    assert torch.equal(o, got["o"])


@pytest.mark.gpu
def test_gpu_chunk_bf16_dh_three_stages_k128(monkeypatch):
    """dh in three stages at K = 128, the launch of B16 x T2048 x H16 (here forced at B2 x T2048 x H8, which has too
    few programs to take it): every gradient against the fp32 reference."""
    monkeypatch.setitem(chunk_mod.STATE_LAUNCH["dh"], 128, [(64, 3)])
    inputs = make_inputs(2, 2048, 8, 128, 128, True, dtype=torch.bfloat16, device="cuda")
    ref = _gpu_reference(inputs, use_qk_l2norm=True)
    got = run(chunk_delta_rule, inputs, use_qk_l2norm=True)
    _assert_gpu_close(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("parts", [1, 2])
def test_gpu_chunk_bf16_state_head_groups(monkeypatch, parts):
    """MoM's packing (40 uneven segments, some empty) at H4 x D256 in bf16, the backward's state kernels one head at
    a time (two programs per SM suffice here), sequences longest first, in one or two time parts; every gradient
    against the fp32 reference."""
    monkeypatch.setattr(chunk_mod, "STATE_GROUP_PROGRAMS_PER_SM", 2)
    monkeypatch.setattr(chunk_mod, "STATE_TIME_PARTS", parts)
    gen = torch.Generator().manual_seed(3)
    cuts = torch.randint(0, 8192, (39,), generator=gen).sort().values
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([8192])]).to("cuda", torch.int32)
    cu[5] = cu[4]  # an empty segment
    inputs = make_inputs(1, 8192, 4, 256, 256, True, dtype=torch.bfloat16, device="cuda", N=40)
    d = chunk_mod._dims(inputs[1], inputs[2], cu, 64, 64, 64)
    bv = chunk_mod._dh_launch(d, torch.bfloat16, torch.device("cuda"), True)[0]
    assert chunk_mod._state_heads(d, torch.device("cuda"), bv) == 1
    ref = _gpu_reference(inputs, cu_seqlens=cu, use_qk_l2norm=True)
    got = run(chunk_delta_rule, inputs, cu_seqlens=cu, use_qk_l2norm=True, check_inputs=False)
    _assert_gpu_close(got, ref)


@pytest.mark.gpu
def test_gpu_fused_recurrent_decode_bf16():
    inputs = make_inputs(8, 4, 4, 256, 256, True, dtype=torch.bfloat16, device="cuda")
    ref = _gpu_reference(inputs, use_qk_l2norm=True)
    got = run(fused_recurrent_delta_rule, inputs, use_qk_l2norm=True)
    _assert_gpu_close(got, ref)
