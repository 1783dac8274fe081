"""write_not_downstream_read: left SVs of (I − P_K)·[W_o | W_down], P_K from what is read after layer l.

P_K: top K = 64 eigenvectors of D_fW_UᵀW_UD_f + Σ_{l' > l} read_gram(l'), where read_gram
is Σ_T D_TW_TᵀW_TD_T over T ∈ {q, k, v, up, gate} and D = diag(γ) of the RMSNorm each reads
through (γ-folded; the original used the raw matrices). Directions a layer writes that no
later layer (nor the unembedding) reads strongly."""

from ws_harness.builders import downstream_read, write_not
from ws_harness.hypothesis import per_layer


@per_layer(family="W:write-not-read", axis="write", refuted=["r_causal"])
def basis(fit, layer):
    return write_not(fit, layer, downstream_read(fit, layer, fit.K), fit.k)
