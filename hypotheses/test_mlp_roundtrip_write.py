"""mlp_roundtrip_write: top-k left singular vectors of W_down·W_up at each layer (the MLP with its nonlinearity linearised away)."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="W:MLP", axis="write", refuted={"r_causal": None, "r_w_combined": [1], "r_w_struct": [1]})
def basis(fit, layer):
    w = fit.weights(layer)
    return left_basis(w.down @ w.up, fit.k)
