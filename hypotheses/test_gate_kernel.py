"""gate_kernel: top-k left SVs of W_down·diag(mean_i silu(W_gate h_i))·W_up at each layer.

h_i are the clean FIT prompts' MLP inputs (the input of up_proj): the MLP linearised
around its average gate activation on these prompts."""

import torch.nn.functional as F

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="W:MLP", axis="write", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    w = fit.weights(layer)
    gate = F.silu(fit.clean.up_in[layer] @ w.gate.T).mean(0)  # [d_ff]
    return left_basis(w.down @ (gate[:, None] * w.up), fit.k)
