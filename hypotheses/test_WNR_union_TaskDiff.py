"""WNR_union_TaskDiff: orthonormal union of write_not_downstream_read and TaskDiff_contrast at each layer.

Up to 2k directions; the nulls use the union's actual rank."""

from ws_harness.builders import downstream_read, write_not
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import pca_basis, union_basis


@per_layer(family="compound", axis="mixed", rank_factor=2, refuted={"r_causal": None, "r_w_combined": [1]})
def basis(fit, layer):
    wnr = write_not(fit, layer, downstream_read(fit, layer, fit.K), fit.k)
    return union_basis(wnr, pca_basis(fit.taskdiff[layer], fit.k))
