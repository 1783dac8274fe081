"""w_oracle_downproj (ceiling): top-k left singular vectors of ΔW_down, at the layers the diff touches.

By Ky Fan no rank-k basis recovers more of it; undefined (no basis) where the diff is absent."""

from ws_harness.hypothesis import ceiling
from ws_harness.scores import combined_weight_target, oracle_basis


@ceiling(oracle_of="r_w_downproj")
def basis(ctx, layer):
    target = combined_weight_target([ctx.delta(layer, role) for role in ["down"]])
    return None if target is None else oracle_basis(target, ctx.k)
