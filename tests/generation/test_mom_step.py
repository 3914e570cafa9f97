"""A MoM decoding step reads and writes only the states of its top-k memories and the shared one: every other
memory's conv and recurrent state stays bitwise unchanged, and the chosen ones change."""
from __future__ import annotations

import pytest
import torch
from gen_helpers import build_model, world  # noqa: F401  (world: a fixture)

from linear_moe.generation import cached_forward, left_pad, new_context
from linear_moe.modules import mom_routing

pytestmark = pytest.mark.usefixtures("world")
HEAD_DIM = ("model.mixers.mom.head_dim=8", "model.mixers.mom.num_memories=6", "model.mixers.mom.topk=2")


@pytest.mark.parametrize("kind", ["gated_delta", "gla"])
def test_step_touches_only_routed_and_shared_memories(kind, monkeypatch):
    _, model = build_model("X-X-", *HEAD_DIM, f"model.mixers.mom.memory_kind={kind}")
    B, M = 3, 6
    tokens, pad = left_pad([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]], torch.device("cpu"))
    ctx = new_context(B, 16)
    cached_forward(model, ctx, tokens, pad, pad)
    before = {n: tuple(t.clone() for t in ctx.key_value_memory_dict[n]) for n in ctx.key_value_memory_dict}
    assert all(t[0].shape[:2] == (B, M + 1) for t in before.values())

    routed = []
    route = mom_routing.route

    def record(logits, topk):
        out = route(logits, topk)
        routed.append(out[2].clone())  # [B, k] memories of this step's tokens, one entry per MoM layer
        return out

    monkeypatch.setattr(mom_routing, "route", record)
    cached_forward(model, ctx, torch.tensor([[11], [12], [13]]), torch.cat([pad, pad.new_zeros(B, 1)], 1))
    assert len(routed) == len(before) == 2
    for (layer, (conv0, rec0)), memories in zip(sorted(before.items()), routed):
        conv1, rec1 = ctx.key_value_memory_dict[layer]
        for b in range(B):
            touched = set(memories[b].tolist()) | {M}
            for m in range(M + 1):
                if m in touched:
                    assert not torch.equal(rec1[b, m], rec0[b, m]), f"layer {layer} seq {b}: memory {m} not updated"
                    assert not torch.equal(conv1[b, m], conv0[b, m])
                else:
                    assert torch.equal(rec1[b, m], rec0[b, m]), f"layer {layer} seq {b}: memory {m} touched"
                    assert torch.equal(conv1[b, m], conv0[b, m])
