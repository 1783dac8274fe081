"""The hypothesis contract: the decorators a `hypotheses/test_<name>.py` file uses and what its builder sees.

A hypothesis file is its docstring (the definition) plus one decorated builder::

    '''write: top-k left singular vectors of [W_o | W_down], what each layer can write.'''
    from ws_harness.hypothesis import per_layer
    from ws_harness.linalg import left_basis

    @per_layer(family="W:write", axis="write")
    def basis(fit, layer):
        return left_basis(fit.weights(layer).write, fit.k)

Builders receive a :class:`FitContext`: base weights (copied before any diff exists), FIT-prompt
captures and the ranks. It holds no diff, no labels, no EVAL prompts and no way to reach the
session, so a hypothesis cannot peek at what it is scored against. Ceilings (which may use the
diff) declare themselves with :func:`ceiling` and receive a :class:`CeilingContext` instead.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ws_harness.arch import Architecture, LayerWeights, expand_kv

__all__ = [
    "AXIS_KINDS",
    "ORACLE_METRICS",
    "CLAIMS",
    "Hypothesis",
    "FitContext",
    "CeilingContext",
    "BaseWeights",
    "per_layer",
    "global_basis",
    "ceiling",
]

AXIS_KINDS = ("write", "read", "mixed", "ceiling")
CLAIMS = ("r_act", "r_w_combined")  # SPEC §6 claims 2 and 3
Scope = Literal["per_layer", "global"]


@dataclass(frozen=True)
class Hypothesis:
    """One hypothesis: metadata and its builder. `name` is the module name without `test_`."""

    name: str
    family: str
    axis: str
    scope: Scope
    build: Callable[..., torch.Tensor]
    definition: str
    module: str
    refuted: Mapping[str, tuple[int | str, ...] | None] = field(default_factory=dict)
    oracle_of: str | None = None  # ceilings only: the metric this basis is the Ky Fan optimum of
    rank_factor: int = 1  # the basis may have up to rank_factor·k directions (unions)

    @property
    def is_ceiling(self) -> bool:
        return self.axis == "ceiling"

    def claims(self) -> tuple[str, ...]:
        """SPEC §6: every axis claims R_act > 1; write/mixed also claim R_w_combined > 1."""
        if self.is_ceiling:
            return ()
        return ("r_act",) if self.axis == "read" else CLAIMS

    def expects_refuted(self, claim: str, seed: int | None, diff_name: str) -> bool:
        """Whether `claim` is recorded as refuted for this diff (by seed, or by name for files)."""
        if claim not in self.refuted:
            return False
        which = self.refuted[claim]
        return which is None or diff_name in which or (seed is not None and seed in which)


def _caller_module(fn: Callable[..., Any]) -> tuple[str, str, str]:
    module_name = fn.__module__
    module = sys.modules.get(module_name)
    doc = inspect.getdoc(module) if module is not None else None
    short = module_name.rsplit(".", 1)[-1]
    name = short[len("test_"):] if short.startswith("test_") else short
    if not doc:
        raise ValueError(
            f"hypothesis module {module_name!r} has no docstring; the docstring is the "
            "hypothesis's definition: write one saying what the basis is"
        )
    return name, doc, module_name


def _normalise_refuted(
    refuted: Sequence[str] | Mapping[str, Sequence[int | str] | None], name: str
) -> dict[str, tuple[int | str, ...] | None]:
    if isinstance(refuted, str):
        raise TypeError(f"hypothesis {name!r}: refuted must be a list of claims, e.g. ['{refuted}']")
    items = refuted.items() if isinstance(refuted, Mapping) else ((c, None) for c in refuted)
    out: dict[str, tuple[int | str, ...] | None] = {}
    for claim, which in items:
        if claim not in CLAIMS:
            raise ValueError(
                f"hypothesis {name!r}: refuted claim {claim!r} is not one of {CLAIMS}"
            )
        if which is not None:
            bad = [w for w in which if isinstance(w, bool) or not isinstance(w, (int, str))]
            if bad:
                raise TypeError(
                    f"hypothesis {name!r}: refuted[{claim!r}] lists {bad}; give diff seeds (int) "
                    "or diff names (str, e.g. a file stem)"
                )
        out[claim] = None if which is None else tuple(which)
    return out


ORACLE_METRICS = ("act", "w_oproj", "w_downproj", "w_combined")


def _decorator(
    scope: Scope, family: str, axis: str, refuted: Any, oracle_of: str | None = None,
    rank_factor: int = 1,
) -> Callable[..., Hypothesis]:
    if oracle_of is not None and oracle_of not in ORACLE_METRICS:
        raise ValueError(f"oracle_of={oracle_of!r} is not one of {ORACLE_METRICS}")
    if axis not in AXIS_KINDS:
        raise ValueError(f"axis {axis!r} is not one of {AXIS_KINDS}")

    def wrap(fn: Callable[..., torch.Tensor]) -> Hypothesis:
        name, doc, module = _caller_module(fn)
        hyp = Hypothesis(
            name=name, family=family, axis=axis, scope=scope, build=fn, definition=doc,
            module=module, refuted=_normalise_refuted(refuted, name), oracle_of=oracle_of,
            rank_factor=rank_factor,
        )
        if axis == "read" and "r_w_combined" in hyp.refuted:
            raise ValueError(
                f"hypothesis {name!r} is read-side: it makes no R_w claim, so none can be refuted"
            )
        return hyp

    return wrap


def per_layer(
    *, family: str, axis: str, refuted: Sequence[str] | Mapping[str, Sequence[int | str] | None] = (),
    rank_factor: int = 1,
) -> Callable[[Callable[[FitContext, int], torch.Tensor]], Hypothesis]:
    """A basis per layer: `build(fit, layer) -> B_l [d, r]` (r ≤ rank_factor·k), or None where undefined.

    `refuted` records claims the hypothesis is known to fail: a list of claims (every diff), or
    {claim: [seeds or diff names]};
    they run as strict xfails, so the record breaks when it stops being true.
    """
    return _decorator("per_layer", family, axis, refuted, rank_factor=rank_factor)


def global_basis(
    *, family: str, axis: str, refuted: Sequence[str] | Mapping[str, Sequence[int] | None] = ()
) -> Callable[[Callable[[FitContext], torch.Tensor]], Hypothesis]:
    """One basis shared by every layer: `build(fit) -> B [d, r]` (its null is one shared subspace)."""
    return _decorator("global", family, axis, refuted)


def ceiling(
    *, family: str = "ceiling", oracle_of: str | None = None
) -> Callable[[Callable[[CeilingContext, int], torch.Tensor]], Hypothesis]:
    """A reference basis built from the diff or its labels: `build(ctx, layer)`, per diff.

    `oracle_of` names the metric it is the rank-k optimum of ('act', 'w_oproj', 'w_downproj',
    'w_combined'); the harness then asserts pct_oracle = 1 and a wide margin over the null.
    """
    return _decorator("per_layer", family, "ceiling", (), oracle_of)


class BaseWeights:
    """Copies of the base model's weights by role, taken once, before any diff is applied."""

    def __init__(self, arch: Architecture) -> None:
        self.n_layers = arch.n_layers
        self._layers = [
            LayerWeights(**{r: getattr(arch.layer(i), r).clone() for r in LayerWeights.__annotations__})
            for i in range(arch.n_layers)
        ]
        self.unembedding = arch.unembedding.clone()
        tied = arch.embedding.data_ptr() == arch.unembedding.data_ptr()
        self.embedding = self.unembedding if tied else arch.embedding.clone()
        self.n_heads, self.n_kv_heads, self.head_dim = arch.n_heads, arch.n_kv_heads, arch.head_dim
        self.d_model = arch.d_model

    def layer(self, layer: int) -> LayerWeights:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        return self._layers[layer]

    def expand_kv(self, w_kv: torch.Tensor) -> torch.Tensor:
        """[H_kv·hd, d] → [H·hd, d]: each KV head's rows repeated for the query heads that share it."""
        return expand_kv(w_kv, self.n_heads, self.n_kv_heads, self.head_dim)


@dataclass(frozen=True)
class Acts:
    """Last-token activations of FIT prompts under one condition, per layer.

    resid [L, n, d]: residual after block l; up_in [L, n, d]: input of mlp.up_proj (normed
    residual); up_out [L, n, d_ff]: its output.
    """

    resid: torch.Tensor
    up_in: torch.Tensor
    up_out: torch.Tensor


class FitContext:
    """All a non-ceiling builder may use (SPEC §3, A side): base weights, FIT captures, ranks.

    k: the run's rank; K: the rank of "broad" projectors (64, capped at d/2).
    clean / positive / negative: :class:`Acts`; taskdiff [L, n, d] = positive − negative
    (paired by prompt). tokens(condition): token-level residuals and last-token attention under
    a persona, right-aligned.
    """

    def __init__(
        self,
        weights: BaseWeights,
        acts: Mapping[str, Acts],
        k: int,
        tokens: Mapping[str, dict[str, torch.Tensor]] | None = None,
        first_token_id: int | None = None,
        answer_ids: tuple[int, int] | None = None,
        broad_rank: int = 64,
    ) -> None:
        self._weights = weights
        self.clean, self.positive, self.negative = acts["clean"], acts["positive"], acts["negative"]
        self.k = k
        self.d = weights.d_model
        self.K = min(broad_rank, self.d // 2)
        self.n_layers = weights.n_layers
        self.n_heads = weights.n_heads
        self._tokens = dict(tokens or {})
        self.first_token_id = first_token_id  # the token every FIT prompt starts with (the sink)
        self.answer_ids = answer_ids  # token ids of the positive / negative verdicts (Yes, No)

    @property
    def layers(self) -> range:
        return range(self.n_layers)

    def weights(self, layer: int) -> LayerWeights:
        return self._weights.layer(layer)

    @property
    def unembedding(self) -> torch.Tensor:
        """W_U [vocab, d]."""
        return self._weights.unembedding

    def expand_kv(self, w_kv: torch.Tensor) -> torch.Tensor:
        return self._weights.expand_kv(w_kv)

    def embedding(self, token_id: int) -> torch.Tensor:
        """Row `token_id` of the input embedding, [d]."""
        return self._weights.embedding[token_id]

    @property
    def taskdiff(self) -> torch.Tensor:
        """taskdiff_A [L, n, d] = pos_fit − neg_fit."""
        return self.positive.resid - self.negative.resid

    def tokens(self, condition: str) -> dict[str, torch.Tensor]:
        """{'resid_tokens' [L, n, T, d], 'attn_last' [L, n, T], 'mask' [n, T]} under a persona."""
        if condition not in ("positive", "negative"):
            raise ValueError(f"token captures exist for 'positive' and 'negative', not {condition!r}")
        if condition not in self._tokens:
            raise ValueError(f"this FitContext was built without token captures for {condition!r}")
        return self._tokens[condition]


class CeilingContext(FitContext):
    """A FitContext plus one diff's B side, for ceilings only (SPEC §5 "Ceilings").

    label [L, n_eval, d] and label_fit [L, n_fit, d]: h(α=+1) − h(α=−1) at the last token;
    delta(layer, role): that layer's ΔW for role 'o' or 'down', or None where untouched.
    """

    def __init__(
        self,
        fit: FitContext,
        label: torch.Tensor,
        label_fit: torch.Tensor,
        deltas: Mapping[tuple[int, str], torch.Tensor],
    ) -> None:
        self.__dict__.update(fit.__dict__)
        self.label = label
        self.label_fit = label_fit
        self._deltas = dict(deltas)

    def delta(self, layer: int, role: str) -> torch.Tensor | None:
        return self._deltas.get((layer, role))
