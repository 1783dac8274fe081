"""qk_x_chars_clusters: the directions qk_circuit and chars_clusters share beyond chance, at each layer.

Principal-vector pairs of the two bases (qk_circuit is γ-folded), each represented by its
bisector, ordered by cosine; all pairs are kept (as the original) except those whose cosine
is at chance level (below the 99th percentile of the largest principal cosine of two random
subspaces of the same ranks). Per-layer columns: shared_cos_max and shared_cos_min, the
largest and smallest kept cosine, and n_shared, how many pairs were kept."""

from ws_harness.builders import qk_chars_shared
from ws_harness.hypothesis import per_layer


@per_layer(family="compound", axis="mixed", refuted=["r_causal", "r_w_combined", "r_w_struct"])
def basis(fit, layer):
    shared, cosines = qk_chars_shared(fit, layer, fit.k)
    if not shared.shape[1]:
        return None
    return shared, {"shared_cos_max": cosines.max(), "shared_cos_min": cosines.min(),
                    "n_shared": len(cosines)}
