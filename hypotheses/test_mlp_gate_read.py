"""mlp_gate_read: top-k right singular vectors of W_gate at each layer: what the MLP's gate reads."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import right_basis


@per_layer(family="W:read", axis="read")
def basis(fit, layer):
    return right_basis(fit.weights(layer).gate, fit.k)
