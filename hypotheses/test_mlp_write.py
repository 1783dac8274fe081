"""mlp_write: top-k left singular vectors of W_down at each layer: what the MLP can write."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="W:write", axis="write", refuted=["r_causal"])
def basis(fit, layer):
    return left_basis(fit.weights(layer).down, fit.k)
