"""TaskDiff_contrast: PCA of taskdiff_A = pos_fit − neg_fit at each layer (paired by prompt).

The directions in which the persona pair moves the last-token residual. As everywhere, PCA
is centered, so the mean persona shift itself is not one of the directions."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import pca_basis


@per_layer(family="act:persona", axis="mixed", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    return pca_basis(fit.taskdiff[layer], fit.k)
