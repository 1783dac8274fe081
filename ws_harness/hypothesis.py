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
from pathlib import Path
from typing import Any, Literal

import torch

from ws_harness import schema
from ws_harness.arch import Architecture, LayerWeights, expand_kv
from ws_harness.linalg import validate_basis
from ws_harness.schema import AXIS_KINDS

__all__ = [
    "AXIS_KINDS",
    "BROAD_RANK",
    "Hypothesis",
    "HypothesisError",
    "FitContext",
    "CeilingContext",
    "BaseWeights",
    "broad_rank_for",
    "check_bases",
    "split_columns",
    "per_layer",
    "global_basis",
    "ceiling",
    "catalog_hypotheses",
]

BROAD_RANK = 64  # SPEC §5: the rank K of "broad" projectors, capped at d/2 (broad_rank_for)


def broad_rank_for(d: int, broad_rank: int = BROAD_RANK) -> int:
    """K for a model of width d: BROAD_RANK, at most d/2 (a projector must leave room)."""
    return min(broad_rank, d // 2)


class HypothesisError(ValueError):
    """A hypothesis's builder raised or returned something that is not a valid basis."""
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
    file: str = ""  # the hypothesis file's path (where its recorded findings live)
    oracle_of: str | None = None  # ceilings only: the metric this basis is the Ky Fan optimum of
    rank_factor: int = 1  # the basis may have up to rank_factor·k directions (unions)

    @property
    def is_ceiling(self) -> bool:
        return self.axis == "ceiling"

    def claims(self) -> tuple[str, ...]:
        """SPEC §6: the claims its axis kind makes (schema.claims_for; ceilings make none)."""
        return schema.claims_for(self.axis)

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


def _claim_file(module_name: str, fn: Callable[..., Any]) -> None:
    """One file, one hypothesis: a second decorated builder would silently replace the first.

    The record lives on the module object being executed, so re-importing a file starts afresh.
    """
    module = sys.modules.get(module_name)
    if module is None:
        return
    taken = module.__dict__.setdefault("__ws_builders__", [])
    taken.append(fn.__name__)
    if len(taken) > 1:
        where = getattr(module, "__file__", None) or module_name
        names = " and ".join(repr(n) for n in taken)
        raise ValueError(
            f"{where}: defines {len(taken)} decorated builders ({names}); a hypothesis file "
            "holds exactly one (its name is the file's). Move the other into its own file"
        )


def _normalise_refuted(
    refuted: Sequence[str] | Mapping[str, Sequence[int | str] | None], name: str
) -> dict[str, tuple[int | str, ...] | None]:
    if isinstance(refuted, str):
        raise TypeError(f"hypothesis {name!r}: refuted must be a list of claims, e.g. ['{refuted}']")
    items = refuted.items() if isinstance(refuted, Mapping) else ((c, None) for c in refuted)
    out: dict[str, tuple[int | str, ...] | None] = {}
    for claim, which in items:
        if claim not in schema.claim_names():
            raise ValueError(
                f"hypothesis {name!r}: refuted claim {claim!r} is not one of "
                f"{schema.claim_names()}"
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


def _decorator(
    scope: Scope, family: str, axis: str, refuted: Any, oracle_of: str | None = None,
    rank_factor: int = 1,
) -> Callable[..., Hypothesis]:
    if oracle_of is not None and oracle_of not in schema.oracle_names():
        raise ValueError(f"oracle_of={oracle_of!r} is not one of {schema.oracle_names()}")
    if axis not in AXIS_KINDS:
        raise ValueError(f"axis {axis!r} is not one of {AXIS_KINDS}")

    def wrap(fn: Callable[..., torch.Tensor]) -> Hypothesis:
        name, doc, module = _caller_module(fn)
        _claim_file(module, fn)
        hyp = Hypothesis(
            name=name, family=family, axis=axis, scope=scope, build=fn, definition=doc,
            module=module, file=inspect.getsourcefile(fn) or "",
            refuted=_normalise_refuted(refuted, name), oracle_of=oracle_of,
            rank_factor=rank_factor,
        )
        not_made = sorted(set(hyp.refuted) - set(hyp.claims()))
        if not_made:
            raise ValueError(
                f"hypothesis {name!r} ({axis} axis) makes no {not_made} claim, so none can be "
                f"refuted; its claims are {list(hyp.claims())}"
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

    `oracle_of` names the recovery metric it is the rank-k optimum of ('r_act', 'r_w_oproj',
    'r_w_downproj', 'r_w_combined', see schema.oracle_names); the harness then asserts
    pct_oracle = 1 and a wide margin over the null.
    """
    return _decorator("per_layer", family, "ceiling", (), oracle_of)


def catalog_hypotheses(
    folders: Sequence[Path], skip: set[str] = frozenset()  # type: ignore[assignment]
) -> tuple[dict[str, Hypothesis], dict[str, str]]:
    """Every hypothesis defined by a `test_*.py` file of `folders` (files in `skip` excepted).

    Files already imported (by pytest's collection) are reused; others are imported under
    their plain module name, as pytest's default import mode would. Returns (name → hypothesis,
    name → why its file could not be imported).
    """
    import importlib.util

    found: dict[str, Hypothesis] = {}
    problems: dict[str, str] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("test_*.py")):
            if str(path) in skip:
                continue
            module_name = path.stem
            module = sys.modules.get(module_name)
            if module is None or getattr(module, "__file__", None) != str(path):
                spec = importlib.util.spec_from_file_location(module_name, path)
                if spec is None or spec.loader is None:
                    continue
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception as exc:  # noqa: BLE001 - reported, not fatal to this run
                    sys.modules.pop(module_name, None)
                    problems[path.stem.removeprefix("test_")] = (
                        f"{path}: cannot be imported for the BH family "
                        f"({type(exc).__name__}: {exc})")
                    continue
            for value in vars(module).values():
                if isinstance(value, Hypothesis) and value.module == module_name:
                    found[value.name] = value
    return found, problems


class BaseWeights:
    """Copies of the base model's weights by role, taken once, before any diff is applied.

    Per layer a :class:`LayerWeights` (with its two RMSNorm gains); the unembedding W_U, the
    input embedding, and ``final_norm`` (γ of the final RMSNorm W_U reads through).
    """

    def __init__(self, arch: Architecture) -> None:
        self.n_layers = arch.n_layers
        fields = LayerWeights.__dataclass_fields__
        self._layers = [
            LayerWeights(**{f: getattr(live, f).clone() for f in fields})
            for live in (arch.layer(i) for i in range(arch.n_layers))
        ]
        self.unembedding = arch.unembedding.clone()
        self.final_norm = arch.final_norm_gain.clone()
        tied = arch.embedding.data_ptr() == arch.unembedding.data_ptr()
        self.embedding = self.unembedding if tied else arch.embedding.clone()
        self.n_heads, self.n_kv_heads, self.head_dim = arch.n_heads, arch.n_kv_heads, arch.head_dim
        self.d_model = arch.d_model

    @classmethod
    def from_tensors(
        cls, layers: Sequence[LayerWeights], unembedding: torch.Tensor, final_norm: torch.Tensor,
        n_heads: int, n_kv_heads: int, embedding: torch.Tensor | None = None,
    ) -> BaseWeights:
        """BaseWeights from plain tensors (synthetic weights in tests; no model needed)."""
        if not layers:
            raise ValueError("layers is empty: BaseWeights needs at least one layer")
        d = int(unembedding.shape[1])
        if final_norm.shape != (d,):
            raise ValueError(f"final_norm has shape {tuple(final_norm.shape)}, expected ({d},)")
        if n_heads % n_kv_heads or layers[0].q.shape[0] % n_heads:
            raise ValueError(
                f"n_heads={n_heads}, n_kv_heads={n_kv_heads} do not fit q of shape "
                f"{tuple(layers[0].q.shape)}"
            )
        self = cls.__new__(cls)
        self.n_layers = len(layers)
        self._layers = list(layers)
        self.unembedding, self.final_norm = unembedding, final_norm
        self.embedding = unembedding if embedding is None else embedding
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = int(layers[0].q.shape[0]) // n_heads
        self.d_model = d
        return self

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
        broad_rank: int = BROAD_RANK,
    ) -> None:
        self._inputs = {"weights": weights, "acts": acts, "k": k, "tokens": tokens,
                        "first_token_id": first_token_id, "answer_ids": answer_ids,
                        "broad_rank": broad_rank}
        self._memo: dict[tuple, Any] = {}
        self._weights = weights
        self.clean, self.positive, self.negative = acts["clean"], acts["positive"], acts["negative"]
        self.k = k
        self.d = weights.d_model
        self.K = broad_rank_for(self.d, broad_rank)
        self.n_layers = weights.n_layers
        self.n_heads = weights.n_heads
        self._tokens = dict(tokens or {})
        self.first_token_id = first_token_id  # the token every FIT prompt starts with (the sink)
        self.answer_ids = answer_ids  # token ids of the positive / negative verdicts (Yes, No)

    def memo(self, key: tuple, build: Callable[[], Any]) -> Any:
        """`build()` once per context and key (shared projectors reused by per-layer builders).

        Each context has its own store: a CeilingContext never sees a FitContext's entries, and
        a diff-derived entry never leaks into non-ceiling builders.
        """
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def layers(self) -> range:
        return range(self.n_layers)

    def weights(self, layer: int) -> LayerWeights:
        """That layer's raw weights; ``.read(role)`` gives a read matrix with its γ folded in."""
        return self._weights.layer(layer)

    @property
    def unembedding(self) -> torch.Tensor:
        """W_U [vocab, d] as stored (it reads the *final-normed* residual; see unembedding_read)."""
        return self._weights.unembedding

    @property
    def final_norm(self) -> torch.Tensor:
        """γ_final [d]: the gain of the final RMSNorm that W_U reads through."""
        return self._weights.final_norm

    @property
    def unembedding_read(self) -> torch.Tensor:
        """W_U·diag(γ_final) [vocab, d]: the unembedding in residual coordinates (SPEC §5)."""
        return self.memo(("unembedding_read",), lambda: self.unembedding * self.final_norm.to(
            self.unembedding.dtype))

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
    """A FitContext plus one diff's B side, for ceilings only (SPEC §5 "Ceilings", §4.1).

    label [L, n_eval, d] and label_fit [L, n_fit, d]: h(α=+1) − h(α=−1) at the last token;
    block_label [L, n_eval, d]: the block-local label (h_out − h_in)(α=+1) − (h_out − h_in)(α=−1),
    i.e. label[l] − label[l−1] (the embedding, block 0's input, is not part of a diff);
    delta(layer, role): that layer's ΔW for a role, or None where untouched;
    causal(layer): the attribution matrix C_l of the residual writes (SPEC §4.1), or None.
    """

    def __init__(
        self,
        fit: FitContext,
        label: torch.Tensor,
        label_fit: torch.Tensor,
        deltas: Mapping[tuple[int, str], torch.Tensor],
        causal: Sequence[torch.Tensor | None] = (),
    ) -> None:
        super().__init__(**fit._inputs)  # the same inputs, a fresh memo
        self.label = label
        self.label_fit = label_fit
        self.block_label = torch.cat([label[:1], label[1:] - label[:-1]])
        self._deltas = dict(deltas)
        self._causal = list(causal)

    def delta(self, layer: int, role: str) -> torch.Tensor | None:
        return self._deltas.get((layer, role))

    def causal(self, layer: int) -> torch.Tensor | None:
        return self._causal[layer] if self._causal else None


def split_columns(hyp: Hypothesis, raw: Any, n_layers: int) -> tuple[Any, list[dict[str, float]]]:
    """A builder returns a basis, or `(basis, {column: number})` to report per-layer columns
    beside the scores (e.g. the principal cosines a basis was selected by). Returns the bases
    as check_bases takes them and the columns per layer."""

    def one(item: Any, where: str) -> tuple[Any, dict[str, float]]:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Mapping)):
            return item, {}
        basis, columns = item
        out: dict[str, float] = {}
        for name, value in columns.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise HypothesisError(f"{where}: column name {name!r} must be an identifier")
            try:
                out[name] = float(value)
            except (TypeError, ValueError):
                raise HypothesisError(
                    f"{where}: column {name!r} is {type(value).__name__}, not a number") from None
        return basis, out

    if hyp.scope == "global":
        basis, columns = one(raw, f"hypothesis {hyp.name!r}")
        return basis, [columns] * n_layers
    if not isinstance(raw, (list, tuple)) or len(raw) != n_layers:
        return raw, [{} for _ in range(n_layers)]  # check_bases names the problem
    pairs = [one(item, f"hypothesis {hyp.name!r} layer {l}") for l, item in enumerate(raw)]
    return [b for b, _ in pairs], [c for _, c in pairs]


def check_bases(hyp: Hypothesis, raw: Any, n_layers: int, d: int) -> list[torch.Tensor | None]:
    """Validate a builder's output into one float32 [d, r] basis (or None) per layer (claim 1)."""
    if hyp.scope == "global":
        per_layer = [raw] * n_layers
    elif isinstance(raw, (list, tuple)) and len(raw) == n_layers:
        per_layer = raw
    else:
        raise HypothesisError(
            f"hypothesis {hyp.name!r}: a per-layer builder must give one basis per layer "
            f"({n_layers}), got {type(raw).__name__}"
        )
    out: list[torch.Tensor | None] = []
    for layer, basis in enumerate(per_layer):
        where = f"hypothesis {hyp.name!r}" + ("" if hyp.scope == "global" else f" layer {layer}")
        if basis is None:
            out.append(None)
            continue
        if not isinstance(basis, torch.Tensor):
            raise HypothesisError(f"{where}: builder returned {type(basis).__name__}, not a tensor")
        basis = basis.detach().to(torch.float32)
        try:
            validate_basis(basis, d, name=where, tol=schema.BASIS_ORTHONORMAL_TOL)
        except (ValueError, TypeError) as exc:
            raise HypothesisError(str(exc)) from None
        out.append(basis.contiguous())
    if all(b is None for b in out):
        raise HypothesisError(f"hypothesis {hyp.name!r}: builder returned no basis at any layer")
    return out
