"""causally_isolated: left SVs of [W_o | W_down] after removing input_super ∪ kv_super ∪ P_K(lm_head_read).

As the original: input_super and kv_super of the same layer at rank k, lm_head_read at the
broad rank K = 64 (all read bases γ-folded): what a layer writes where neither it, attention's
keys/values, nor the unembedding read strongly."""

from ws_harness.builders import input_super, kv_super, lm_head_read, write_not
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import union_basis


@per_layer(family="W:write-not-read", axis="write", refuted={"r_causal": None, "r_w_combined": [1, 2], "r_w_struct": [1, 2]})
def basis(fit, layer):
    read = union_basis(input_super(fit, layer, fit.k), kv_super(fit, layer, fit.k),
                       lm_head_read(fit, fit.K))
    return write_not(fit, layer, read, fit.k)
