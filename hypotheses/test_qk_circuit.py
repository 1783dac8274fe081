"""qk_circuit: top-k left singular vectors of (W_q D)ᵀ·(W_k D) at each layer, GQA-expanded, D = diag(γ_attn).

Σ_h (W_q^h D)ᵀ W_k^{g(h)} D: each query head is paired with the key head of its GQA group,
never with another group's; both read the attention-normed residual, so its gain is folded
in on both sides (the original used the raw matrices). Left SVs: the query-side residual
directions that drive attention scores."""

from ws_harness.builders import qk_circuit
from ws_harness.hypothesis import per_layer


@per_layer(family="W:QK", axis="mixed", refuted={"r_causal": None, "r_w_struct": [2]})
def basis(fit, layer):
    return qk_circuit(fit, layer, fit.k)
