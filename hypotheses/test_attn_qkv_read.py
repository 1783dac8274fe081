"""attn_qkv_read: top-k right singular vectors of [W_q; W_k; W_v] at each layer: what attention reads."""

import torch

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import right_basis


@per_layer(family="W:read", axis="read", refuted={"r_act": [1]})
def basis(fit, layer):
    w = fit.weights(layer)
    return right_basis(torch.cat([w.q, w.k, w.v]), fit.k)
