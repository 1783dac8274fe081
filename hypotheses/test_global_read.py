"""global_read: top-k eigenvectors of Σ_l Σ_T D_TW_TᵀW_TD_T + D_fW_UᵀW_UD_f (global), T ∈ {q, k, v, up, gate}.

What the whole model reads most, pooled over every layer and the unembedding, each read
matrix in residual coordinates: D = diag(γ) of the RMSNorm it reads through (attention's,
the MLP's, the final norm). The original used the raw matrices."""

from ws_harness.builders import global_read
from ws_harness.hypothesis import global_basis


@global_basis(family="W:read", axis="read", refuted={"r_act": None, "r_causal_read": [0]})
def basis(fit):
    return global_read(fit, fit.k)
