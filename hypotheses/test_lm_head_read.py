"""lm_head_read: the top-k right singular vectors of W_U·diag(γ_final) (global).

The residual directions the logits read most strongly: W_U reads the final-normed residual,
so the final RMSNorm's gain is folded in (the original used the raw W_U). A read-side basis:
a high R_w would mean the diff writes where the output reads, not that it explains the diff."""

from ws_harness.builders import lm_head_read
from ws_harness.hypothesis import global_basis


@global_basis(family="W:unembed", axis="read", refuted={"r_act": None, "r_causal_read": [0]})
def basis(fit):
    return lm_head_read(fit, fit.k)
