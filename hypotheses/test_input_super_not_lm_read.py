"""input_super_not_lm_read: input_super with the K = 64 lm_head_read directions removed, re-orthonormalised.

Both γ-folded (input_super through the layer's two RMSNorm gains, lm_head_read through the
final norm's). Rank-detected: directions of input_super lying inside P_K(lm_head_read) are
dropped rather than kept as noise, so the basis may have fewer than k directions."""

from ws_harness.builders import input_super, lm_head_read
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import remove_subspace


@per_layer(family="W:read", axis="read", refuted={"r_act": [0, 1]})
def basis(fit, layer):
    return remove_subspace(input_super(fit, layer, fit.k), lm_head_read(fit, fit.K))
