"""up_proj_output_written_contrast: PCA of the persona contrast of up_proj's output, mapped to d_model by W_down."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import pca_basis


@per_layer(family="act:up_proj", axis="mixed", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    contrast = fit.positive.up_out[layer] - fit.negative.up_out[layer]  # [n, d_ff]
    return pca_basis(contrast @ fit.weights(layer).down.T, fit.k)
