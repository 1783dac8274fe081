"""attn_diff_taskdiff: PCA of token-level persona differences, each row weighted by √|a⁺ − a⁻|.

Rows: h⁺_t − h⁻_t at every position real under both personas, sequences right-aligned;
a± is the attention of the last token to position t (mean over heads) under each persona."""

from ws_harness.builders import attention_weighted_diffs
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import pca_basis


@per_layer(family="act:attn-selected", axis="mixed", refuted=["r_causal"])
def basis(fit, layer):
    return pca_basis(attention_weighted_diffs(fit, layer, "diff"), fit.k)
