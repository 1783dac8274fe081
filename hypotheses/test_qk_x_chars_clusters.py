"""qk_x_chars_clusters: the directions qk_circuit and chars_clusters share most, at each layer.

The ⌈k/2⌉ most-aligned principal-vector pairs of the two bases, each represented by its
bisector; the cosines of their principal angles are logged in the report."""

from ws_harness.builders import chars_clusters, qk_circuit
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import shared_directions


@per_layer(family="compound", axis="mixed", refuted=["r_causal", "r_w_combined"])
def basis(fit, layer):
    shared, _cosines = shared_directions(qk_circuit(fit, layer, fit.k),
                                         chars_clusters(fit, layer, fit.k), min_cos=0.0)
    return shared[:, : (fit.k + 1) // 2]
