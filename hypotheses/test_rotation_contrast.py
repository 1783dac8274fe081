"""rotation_contrast: the planes of the orthogonal Procrustes rotation neg → pos, inside their joint top-32 PCA.

The skew part R − Rᵀ of the rotation has singular values in equal pairs, one pair per
rotation plane; whole ± pairs are kept (an even number of directions), largest first."""

from ws_harness.builders import procrustes_skew_basis
from ws_harness.hypothesis import per_layer


@per_layer(family="act:rotation", axis="mixed", refuted=["r_causal", "r_w_combined"])
def basis(fit, layer):
    return procrustes_skew_basis(fit.negative.resid[layer], fit.positive.resid[layer], fit.k)
