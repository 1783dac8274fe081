"""global_persona_resid_pca: PCA of the positive- and negative-persona FIT residuals at every layer, pooled (global)."""

import torch

from ws_harness.hypothesis import global_basis
from ws_harness.linalg import pca_basis


@global_basis(family="act:baseline", axis="mixed", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit):
    both = torch.cat([fit.positive.resid, fit.negative.resid], dim=1)
    return pca_basis(both.reshape(-1, fit.d), fit.k)
