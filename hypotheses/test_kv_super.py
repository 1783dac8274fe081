"""kv_super: top-k right singular vectors of [W_k; W_v]·diag(γ_attn) at each layer: what attention reads into keys and values.

γ_attn, the gain of the RMSNorm in front of attention, is folded in (the original used the
raw matrices)."""

from ws_harness.builders import kv_super
from ws_harness.hypothesis import per_layer


@per_layer(family="W:read", axis="read", refuted=["r_act"])
def basis(fit, layer):
    return kv_super(fit, layer, fit.k)
