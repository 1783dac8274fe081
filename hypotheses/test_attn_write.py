"""attn_write: top-k left singular vectors of W_o at each layer: what attention can write."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="W:write", axis="write", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    return left_basis(fit.weights(layer).o, fit.k)
