"""logits_null: the bottom-k right singular vectors of the unembedding W_U (global).

The directions the logits are least sensitive to; a natural home for steering that changes
internal state without directly moving the output."""

from ws_harness.hypothesis import global_basis
from ws_harness.linalg import bottom_right_basis


@global_basis(family="W:unembed", axis="read", refuted={"r_act": None, "r_causal_read": [0]})
def basis(fit):
    return bottom_right_basis(fit.unembedding, fit.k)
