"""write_not_downstream_read: left SVs of (I − P_K)·[W_o | W_down], P_K from what is read after layer l.

P_K: top K = 64 eigenvectors of W_UᵀW_U + Σ_{l' > l} read_gram(l'), where read_gram is
W_qᵀW_q + W_kᵀW_k + W_vᵀW_v + W_upᵀW_up + W_gateᵀW_gate. Directions a layer writes that no
later layer (nor the unembedding) reads strongly."""

from ws_harness.builders import downstream_read, write_not
from ws_harness.hypothesis import per_layer


@per_layer(family="W:write-not-read", axis="write", refuted={"r_causal": None, "r_w_combined": [1, 2]})
def basis(fit, layer):
    return write_not(fit, layer, downstream_read(fit, layer, fit.K), fit.k)
