"""churn: PCA of h_{l+1} − h_l on clean FIT prompts: what block l + 1 changes. Undefined at the last layer."""

from ws_harness.hypothesis import per_layer
from ws_harness.linalg import pca_basis


@per_layer(family="act:clean", axis="mixed", refuted={"r_act_specific": [1], "r_causal": None, "r_w_combined": None, "r_w_struct": None})
def basis(fit, layer):
    if layer + 1 >= fit.n_layers:
        return None
    return pca_basis(fit.clean.resid[layer + 1] - fit.clean.resid[layer], fit.k)
