"""global_write_not_global_read: left SVs of (I − P_K(global_read))·all layers' [W_o | W_down] (global).

What the model writes, after removing the K = 64 directions it reads most (global_read,
γ-folded): the top eigenvectors of (I − P) (Σ_l W_l W_lᵀ) (I − P)."""

import torch

from ws_harness.builders import all_layers_write_gram, global_read, gram_basis
from ws_harness.hypothesis import global_basis


@global_basis(family="W:write-not-read", axis="write", refuted={"r_causal": None, "r_w_combined": [2]})
def basis(fit):
    P = global_read(fit, fit.K).double()
    keep = torch.eye(fit.d, dtype=torch.float64) - P @ P.T
    return gram_basis(keep @ all_layers_write_gram(fit) @ keep, fit.k)
