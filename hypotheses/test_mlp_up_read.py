"""mlp_up_read: top-k right singular vectors of W_up at each layer: what the MLP's up projection reads."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import right_basis


@per_layer(family="W:read", axis="read", refuted=["r_act"])
def basis(fit, layer):
    return right_basis(fit.weights(layer).up, fit.k)
