"""added_features: global PCA over prompts of Σ_l relu(|h_{l+1}| − |h_l|), per dimension (clean FIT residuals)."""

from ws_harness.builders import abs_changes
from ws_harness.hypothesis import global_basis
from ws_harness.linalg import pca_basis


@global_basis(family="act:clean", axis="mixed", refuted=["r_act", "r_act_specific", "r_causal", "r_w_combined", "r_w_struct"])
def basis(fit):
    return pca_basis(abs_changes(fit).clamp(min=0).sum(0), fit.k)
