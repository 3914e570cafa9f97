"""The delta rule family (DeltaNet, gated DeltaNet): chunked Triton kernels, a fused recurrent kernel for decoding,
the step-by-step definition and a chunked pure-torch path for CPU."""
from linear_moe.kernels.delta_rule.chunk import chunk_delta_rule
from linear_moe.kernels.delta_rule.fused_recurrent import fused_recurrent_delta_rule
from linear_moe.kernels.delta_rule.naive import naive_recurrent_delta_rule, torch_chunk_delta_rule

__all__ = ["chunk_delta_rule", "fused_recurrent_delta_rule", "naive_recurrent_delta_rule", "torch_chunk_delta_rule"]
