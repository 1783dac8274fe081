"""attn_min_x_diffnorm_taskdiff: as attn_min_taskdiff, with row weight √(min(a⁺, a⁻) · ‖Δh‖ / mean nonzero ‖Δh‖).

The square root of the product, as in the original (so each row's covariance weight is
min(a⁺, a⁻)·‖Δh‖/scale); a = last-token attention to that position, mean over heads."""

from ws_harness.builders import attention_weighted_diffs
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import pca_basis


@per_layer(family="act:attn-selected", axis="mixed", refuted=["r_causal"])
def basis(fit, layer):
    rows = attention_weighted_diffs(fit, layer, "min", times_diffnorm=True)
    return pca_basis(rows, fit.k)
