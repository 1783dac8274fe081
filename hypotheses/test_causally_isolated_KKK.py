"""causally_isolated_KKK: causally_isolated with all three removed read bases at the broad rank K = 64.

Left SVs of [W_o | W_down] after removing input_super (K) ∪ kv_super (K) ∪ P_K(lm_head_read),
all γ-folded: a stricter variant (up to 3K directions removed) than the original's k/k/K."""

from ws_harness.builders import input_super, kv_super, lm_head_read, write_not
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import union_basis


@per_layer(family="W:write-not-read", axis="write", refuted={"r_causal": None, "r_w_combined": [1], "r_w_struct": [1]})
def basis(fit, layer):
    read = union_basis(input_super(fit, layer, fit.K), kv_super(fit, layer, fit.K),
                       lm_head_read(fit, fit.K))
    return write_not(fit, layer, read, fit.k)
