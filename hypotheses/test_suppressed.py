"""suppressed: global PCA over prompts of min(Σ_l relu(Δ|h|), Σ_l relu(−Δ|h|)) per dimension.

Δ|h| is the change of each dimension's magnitude between consecutive layers (clean FIT
residuals). A dimension scores high when it is both built up and torn down along the way."""

import torch

from ws_harness.builders import abs_changes
from ws_harness.hypothesis import global_basis
from ws_harness.linalg import pca_basis


@global_basis(family="act:clean", axis="mixed", refuted=["r_act", "r_act_specific", "r_causal", "r_w_combined", "r_w_struct"])
def basis(fit):
    delta = abs_changes(fit)  # [L−1, n, d]
    both = torch.minimum(delta.clamp(min=0).sum(0), (-delta).clamp(min=0).sum(0))
    return pca_basis(both, fit.k)
