"""write_not_global_read: left SVs of (I − P_K(global_read))·[W_o | W_down] at each layer.

What a layer writes outside the K = 64 directions the whole model reads most."""

from ws_harness.builders import global_read, write_not
from ws_harness.hypothesis import per_layer


@per_layer(family="W:write-not-read", axis="write", refuted={"r_causal": None, "r_w_combined": [1, 2]})
def basis(fit, layer):
    return write_not(fit, layer, global_read(fit, fit.K), fit.k)
