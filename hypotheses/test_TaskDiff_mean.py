"""TaskDiff_mean: the diff-in-means direction mean_i taskdiff_A at each layer (rank 1).

taskdiff_A = pos_fit − neg_fit, paired by prompt; its mean is the classic contrastive
steering vector, the signal that centered PCA (TaskDiff_contrast) removes."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import orthonormalize


@per_layer(family="act:persona", axis="mixed")
def basis(fit, layer):
    B = orthonormalize(fit.taskdiff[layer].mean(0)[:, None])
    return B if B.shape[1] else None
