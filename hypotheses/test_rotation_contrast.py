"""rotation_contrast: planes of the orthogonal Procrustes rotation neg → pos, inside their joint top PCA.

Each persona set is centered on its own mean (as the original). The joint PCA keeps at most
32 directions and never more than the cross-covariance determines (≤ n − 1 for n prompts;
beyond that R = UVᵀ would be an arbitrary completion). The skew part R − Rᵀ has singular
values 2·sin θ in equal pairs, one pair per rotation plane: whole ± pairs are kept, largest
first, and only those above the noise level (the largest a no-rotation fit with the same
residual noise produces). Layers with no real rotation have no basis."""

from ws_harness.builders import procrustes_skew_basis
from ws_harness.hypothesis import per_layer


@per_layer(family="act:rotation", axis="mixed", refuted={"r_act": [0, 2], "r_act_specific": [0, 2], "r_causal": None, "r_w_combined": None, "r_w_struct": None})
def basis(fit, layer):
    B = procrustes_skew_basis(fit.negative.resid[layer], fit.positive.resid[layer], fit.k)
    return B if B.shape[1] else None
