"""input_super: top-k right singular vectors of [W_q; W_k; W_v; W_up; W_gate] at each layer.

Everything a layer reads, attention and MLP together."""

from ws_harness.builders import input_super
from ws_harness.hypothesis import per_layer


@per_layer(family="W:read", axis="read")
def basis(fit, layer):
    return input_super(fit, layer, fit.k)
