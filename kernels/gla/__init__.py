"""Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t."""
from linear_moe.kernels.gla.chunk import chunk_gla
from linear_moe.kernels.gla.fused_recurrent import fused_recurrent_gla
from linear_moe.kernels.gla.naive import naive_recurrent_gla, torch_chunk_gla

__all__ = ["chunk_gla", "fused_recurrent_gla", "naive_recurrent_gla", "torch_chunk_gla"]
