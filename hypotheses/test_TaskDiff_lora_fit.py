"""TaskDiff_lora_fit (informative ceiling): uncentered PCA of label_fit = h(α=+1) − h(α=−1) on FIT prompts.

Top-k right singular vectors of label_fit without removing its mean: the label's A is an
uncentered second moment and the mean shift is its main signal. Uses the diff's own effect,
on the FIT side, so it is not a hypothesis; it shows how much of the EVAL label a basis fit
to the same kind of label recovers out of sample."""

from ws_harness.hypothesis import ceiling
from ws_harness.linalg import uncentered_basis


@ceiling()
def basis(ctx, layer):
    if not ctx.label_fit[layer].any():
        return None  # upstream of every touched layer the diff changes nothing
    return uncentered_basis(ctx.label_fit[layer], ctx.k)
