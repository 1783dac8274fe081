"""attention_sink: PCA of the per-head vectors W_o^h W_v^h e_BOS at each layer.

e_BOS is the embedding of the token every prompt starts with (the attention sink); each
query head h reads it through its GQA group's value head. Centered PCA of H vectors has rank
≤ H − 1, and only supported directions are returned."""

import torch

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import pca_basis


@per_layer(family="W:OV", axis="write", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    w = fit.weights(layer)
    value = (fit.expand_kv(w.v) @ fit.embedding(fit.first_token_id)).reshape(fit.n_heads, -1)
    o_heads = w.o.reshape(fit.d, fit.n_heads, -1)  # [d, H, hd]
    per_head = torch.einsum("dhe,he->hd", o_heads, value)  # row h: W_o^h W_v^h e_BOS
    return pca_basis(per_head, fit.k)
