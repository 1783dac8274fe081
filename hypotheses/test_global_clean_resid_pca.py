"""global_clean_resid_pca: PCA of every clean FIT residual at every layer, pooled (global)."""

from ws_harness.hypothesis import global_basis
from ws_harness.linalg import pca_basis


@global_basis(family="act:baseline", axis="mixed", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit):
    return pca_basis(fit.clean.resid.reshape(-1, fit.d), fit.k)
