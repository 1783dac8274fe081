"""global_write: top-k left singular vectors of all layers' [W_o | W_down] side by side (global).

Computed as the top eigenvectors of Σ_l W_l W_lᵀ, which equals the left SVD of the
concatenation without materialising it."""

from ws_harness.builders import all_layers_write_gram, gram_basis
from ws_harness.hypothesis import global_basis


@global_basis(family="W:write", axis="write", refuted={"r_causal": None, "r_w_combined": None, "r_w_struct": [2]})
def basis(fit):
    return gram_basis(all_layers_write_gram(fit), fit.k)
