"""lm_head_read: the top-k right singular vectors of the unembedding W_U (global).

The residual directions the logits read most strongly. A read-side basis: a high R_w would
mean the diff writes where the output reads, not that it explains the diff."""

from ws_harness.hypothesis import global_basis
from ws_harness.linalg import right_basis


@global_basis(family="W:unembed", axis="read", refuted=["r_act"])
def basis(fit):
    return right_basis(fit.unembedding, fit.k)
