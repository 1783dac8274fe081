"""write_not_global_read: left SVs of (I − P_K(global_read))·[W_o | W_down] at each layer.

What a layer writes outside the K = 64 directions the whole model reads most (global_read,
γ-folded: each read matrix times the gain of the RMSNorm it reads through)."""

from ws_harness.builders import global_read, write_not
from ws_harness.hypothesis import per_layer


@per_layer(family="W:write-not-read", axis="write", refuted=["r_causal"])
def basis(fit, layer):
    return write_not(fit, layer, global_read(fit, fit.K), fit.k)
