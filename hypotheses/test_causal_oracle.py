"""causal_oracle (ceiling): top-k eigenvectors of the attribution matrix C_l = Σ_T sym(ΔW_T Ḡ_Tᵀ), T ∈ {o_proj, down_proj} (SPEC §4.1).

Ḡ is the gradient of the mean EVAL margin logit(Yes) − logit(No) averaged along the path θ + t·w,
t ∈ [−1, 1]. By Ky Fan no rank-k basis keeps more of the linear (first-order) steering of the
residual writes, so pct_oracle_causal is c_lin(B)/c_lin(this)."""

from ws_harness.hypothesis import ceiling
from ws_harness.linalg import top_eigenvectors


@ceiling(oracle_of="r_causal")
def basis(ctx, layer):
    C = ctx.causal(layer)
    return None if C is None else top_eigenvectors(C, ctx.k)
