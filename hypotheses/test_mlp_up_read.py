"""mlp_up_read: top-k right singular vectors of W_up·diag(γ_mlp) at each layer: what the MLP's up projection reads.

γ_mlp is the gain of the RMSNorm in front of the MLP (folded in; the original used raw W_up)."""

from ws_harness.builders import read_basis
from ws_harness.hypothesis import per_layer


@per_layer(family="W:read", axis="read", refuted={"r_act": None, "r_causal_read": [0]})
def basis(fit, layer):
    return read_basis(fit, layer, ("up",), fit.k)
