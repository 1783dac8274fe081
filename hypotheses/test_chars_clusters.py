"""chars_clusters: PCA of the centroids of k-means (k clusters) over clean ∪ pos ∪ neg FIT residuals at each layer.

k-means starts from a deterministic farthest-point initialisation. k centered centroids span
at most k − 1 directions, and only those are returned (the original returned k from a
rank-(k − 1) set)."""

from ws_harness.builders import chars_clusters
from ws_harness.hypothesis import per_layer


@per_layer(family="act:cluster", axis="mixed", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    return chars_clusters(fit, layer, fit.k)
