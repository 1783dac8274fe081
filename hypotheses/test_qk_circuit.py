"""qk_circuit: top-k left singular vectors of W_qᵀ·W_k at each layer, GQA-expanded.

Σ_h W_q^hᵀ W_k^{g(h)}: each query head is paired with the key head of its GQA group, never
with another group's. Left SVs: the query-side directions that drive attention scores."""

from ws_harness.builders import qk_circuit
from ws_harness.hypothesis import per_layer


@per_layer(family="W:QK", axis="mixed", refuted={"r_act": [1], "r_causal": None})
def basis(fit, layer):
    return qk_circuit(fit, layer, fit.k)
