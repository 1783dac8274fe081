"""attn_ov_write: top-k left singular vectors of the OV circuit W_o·W_v at each layer.

W_v's rows are repeated per GQA group (each query head uses its group's value head), so
W_o·expand(W_v) = Σ_h W_o^h W_v^{g(h)}: what attention writes given what it reads."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="W:OV", axis="write", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    w = fit.weights(layer)
    return left_basis(w.o @ fit.expand_kv(w.v), fit.k)
