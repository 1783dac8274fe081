"""gate_active_written: PCA of (silu(W_gate h) ⊙ W_up h)·W_downᵀ on clean FIT prompts: what the MLP actually writes."""

import torch.nn.functional as F

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import pca_basis


@per_layer(family="act:MLP", axis="mixed", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    w, h = fit.weights(layer), fit.clean.up_in[layer]
    written = (F.silu(h @ w.gate.T) * (h @ w.up.T)) @ w.down.T
    return pca_basis(written, fit.k)
