"""TaskDiff_uncentered: top-k right singular vectors of taskdiff_A = pos_fit − neg_fit, uncentered.

Uncentered PCA (eigenvectors of the second moment): the mean persona shift is kept, so the
diff-in-means direction dominates the first direction rather than being removed."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import uncentered_basis


@per_layer(family="act:persona", axis="mixed", refuted={"r_causal": None, "r_w_combined": None, "r_w_struct": [0, 2]})
def basis(fit, layer):
    return uncentered_basis(fit.taskdiff[layer], fit.k)
