"""logits_null: the bottom-k right singular vectors of W_U·diag(γ_final) (global).

The residual directions the logits are least sensitive to (final RMSNorm gain folded in; the
original used the raw W_U); a natural home for steering that changes internal state without
directly moving the output."""

from ws_harness.builders import logits_null
from ws_harness.hypothesis import global_basis


@global_basis(family="W:unembed", axis="read", refuted={"r_causal_read": [1]})
def basis(fit):
    return logits_null(fit, fit.k)
