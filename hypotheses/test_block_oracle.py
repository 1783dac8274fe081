"""block_oracle (ceiling): top-k right singular vectors (uncentered) of the block-local label (h_out − h_in)(α=+1) − (h_out − h_in)(α=−1) on EVAL prompts.

What block l itself adds to the residual stream under the diff, which matches ΔW's own scope
(the study's v9); the ordinary label also carries everything upstream blocks changed."""

from ws_harness.hypothesis import ceiling
from ws_harness.linalg import right_basis


@ceiling()
def basis(ctx, layer):
    if not ctx.block_label[layer].any():
        return None  # the diff does not change what this block adds
    return right_basis(ctx.block_label[layer], ctx.k)
