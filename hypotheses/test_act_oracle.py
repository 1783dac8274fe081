"""act_oracle (ceiling): top-k eigenvectors of A_act from the EVAL labels themselves (in-sample).

By Ky Fan no rank-k basis recovers more of the activation label; pct_oracle_act is E(B)/E(this)."""

from ws_harness.hypothesis import ceiling
from ws_harness.scores import activation_target, oracle_basis


@ceiling(oracle_of="r_act")
def basis(ctx, layer):
    if not ctx.label[layer].any():
        return None  # upstream of every touched layer the diff changes nothing
    return oracle_basis(activation_target(ctx.label[layer]), ctx.k)
