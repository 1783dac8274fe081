"""amplified: global PCA over prompts of relu(|h_last| − |h_first|), per dimension (clean FIT residuals)."""

from ws_harness.hypothesis import global_basis
from ws_harness.linalg import pca_basis


@global_basis(family="act:clean", axis="mixed", refuted={"r_act": [0, 1], "r_act_specific": [0, 1], "r_causal": None, "r_w_combined": None, "r_w_struct": None})
def basis(fit):
    mag = fit.clean.resid.abs()
    return pca_basis((mag[-1] - mag[0]).clamp(min=0), fit.k)
