"""write_not_lm_head_read: left SVs of (I − P_K(lm_head_read))·[W_o | W_down] at each layer.

What a layer writes outside the K = 64 directions the unembedding reads most (right SVs of
W_U·diag(γ_final): the final norm's gain folded in)."""

from ws_harness.builders import lm_head_read, write_not
from ws_harness.hypothesis import per_layer


@per_layer(family="W:write-not-read", axis="write", refuted={"r_causal": None, "r_w_combined": [1]})
def basis(fit, layer):
    return write_not(fit, layer, lm_head_read(fit, fit.K), fit.k)
