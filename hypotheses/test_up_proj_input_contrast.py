"""up_proj_input_contrast: PCA of the persona contrast of the MLP input (input of up_proj) at each layer."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import pca_basis


@per_layer(family="act:up_proj", axis="mixed", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    return pca_basis(fit.positive.up_in[layer] - fit.negative.up_in[layer], fit.k)
