"""kv_super: top-k right singular vectors of [W_k; W_v] at each layer: what attention reads into keys and values."""

from ws_harness.builders import kv_super
from ws_harness.hypothesis import per_layer


@per_layer(family="W:read", axis="read", refuted=["r_act"])
def basis(fit, layer):
    return kv_super(fit, layer, fit.k)
