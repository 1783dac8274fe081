"""kv_super: top-k right singular vectors of [W_k; W_v] at each layer: what attention reads into keys and values."""

from ws_harness.hypothesis import per_layer
from ws_harness.builders import kv_super


@per_layer(family="W:read", axis="read")
def basis(fit, layer):
    return kv_super(fit, layer, fit.k)
