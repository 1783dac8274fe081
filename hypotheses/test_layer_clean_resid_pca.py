"""layer_clean_resid_pca: PCA of the clean FIT residuals at each layer."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import pca_basis


@per_layer(family="act:baseline", axis="mixed", refuted=["r_act_specific", "r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    return pca_basis(fit.clean.resid[layer], fit.k)
