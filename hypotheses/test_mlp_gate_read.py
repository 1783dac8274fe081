"""mlp_gate_read: top-k right singular vectors of W_gate·diag(γ_mlp) at each layer: what the MLP's gate reads.

γ_mlp is the gain of the RMSNorm in front of the MLP (folded in; the original used raw W_gate)."""

from ws_harness.builders import read_basis
from ws_harness.hypothesis import per_layer


@per_layer(family="W:read", axis="read")
def basis(fit, layer):
    return read_basis(fit, layer, ("gate",), fit.k)
