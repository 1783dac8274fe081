"""input_super: top-k right singular vectors of [W_q D_a; W_k D_a; W_v D_a; W_up D_m; W_gate D_m] at each layer.

Everything a layer reads, attention and MLP together, in residual coordinates: D_a, D_m =
diag(γ) of the RMSNorm in front of attention / the MLP (the original used the raw matrices)."""

from ws_harness.builders import input_super
from ws_harness.hypothesis import per_layer


@per_layer(family="W:read", axis="read")
def basis(fit, layer):
    return input_super(fit, layer, fit.k)
