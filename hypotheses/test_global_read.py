"""global_read: top-k eigenvectors of Σ_l (W_qᵀW_q + W_kᵀW_k + W_vᵀW_v + W_upᵀW_up + W_gateᵀW_gate) + W_UᵀW_U (global).

What the whole model reads most, pooled over every layer and the unembedding."""

from ws_harness.builders import global_read
from ws_harness.hypothesis import global_basis


@global_basis(family="W:read", axis="read", refuted=["r_act"])
def basis(fit):
    return global_read(fit, fit.k)
