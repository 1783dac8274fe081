"""attn_qkv_read: top-k right singular vectors of [W_q; W_k; W_v]·diag(γ_attn) at each layer: what attention reads.

γ_attn is the gain of the RMSNorm in front of attention, folded in because q, k, v read the
normed residual (the original used the raw matrices)."""

from ws_harness.builders import read_basis
from ws_harness.hypothesis import per_layer


@per_layer(family="W:read", axis="read")
def basis(fit, layer):
    return read_basis(fit, layer, ("q", "k", "v"), fit.k)
