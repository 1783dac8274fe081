"""write: top-k left singular vectors of [W_o | W_down] at each layer.

Every direction a layer can add to the residual stream, attention and MLP together."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="W:write", axis="write", refuted=["r_causal"])
def basis(fit, layer):
    return left_basis(fit.weights(layer).write, fit.k)
