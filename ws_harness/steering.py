"""The steering check (SPEC §2.3): logit(Yes) − logit(No) on EVAL prompts across α, paired test."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ws_harness.data import ProbeSet, render_chat
from ws_harness.device import model_device
from ws_harness.diffs import Diff, weight_steer

__all__ = [
    "ALPHAS",
    "P_THRESHOLD",
    "DiffDoesNotSteerError",
    "SteeringCurve",
    "answer_token_ids",
    "answer_logit_diff",
    "steering_curve",
    "check_steers",
    "format_curve",
]

ALPHAS: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
P_THRESHOLD = 0.01  # one-sided, paired over prompts, α=+1 vs α=−1


class DiffDoesNotSteerError(ValueError):
    """A diff does not raise logit(Yes) − logit(No) from α=−1 to α=+1 significantly."""


@dataclass
class SteeringCurve:
    """Per-prompt margins m_i(α) = logit(Yes) − logit(No) at the last prompt token.

    `per_prompt[j][i]` is prompt i at `alphas[j]`; `effect` = mean_i (m_i(+1) − m_i(−1));
    `p_ttest` the one-sided paired t-test (alternative: m(+1) > m(−1)), `p_wilcoxon` the
    one-sided signed-rank test on the same pairs; `steers` = effect > 0 and p_ttest < threshold.
    """

    alphas: list[float]
    per_prompt: list[list[float]]
    mean: list[float]
    sd: list[float]
    n: int
    effect: float
    t: float
    p_ttest: float
    p_wilcoxon: float
    threshold: float
    steers: bool
    answer_ids: list[int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SteeringCurve:
        return cls(**dict(data))

    def mean_at(self, alpha: float) -> float:
        return self.mean[self.alphas.index(float(alpha))]


def answer_token_ids(tokenizer: Any, answer_tokens: Mapping[str, str]) -> tuple[int, int]:
    """Token ids of the positive / negative verdict words (e.g. "Yes" / "No") as the assistant
    would start its reply: the first token after the chat template's generation prompt.

    For SmolLM2 these are "Yes" → 10539 and "No" → 5230 (single tokens, no leading space).
    """
    ids = []
    for side in ("positive", "negative"):
        word = answer_tokens[side]
        prompt = render_chat(tokenizer, ["Answer Yes or No."])[0]
        full = render_chat(tokenizer, ["Answer Yes or No."], assistant_texts=[word])[0]
        if full.startswith(prompt):
            reply = tokenizer.encode(full[len(prompt):], add_special_tokens=False)
        else:  # templates that rewrite earlier turns: fall back to the bare word
            reply = tokenizer.encode(word, add_special_tokens=False)
        if not reply:
            raise ValueError(f"answer word {word!r} ({side}) encodes to no tokens")
        ids.append(int(reply[0]))
    if ids[0] == ids[1]:
        raise ValueError(
            f"answer words {answer_tokens['positive']!r} and {answer_tokens['negative']!r} start "
            f"with the same token {ids[0]}; choose verdict words whose first tokens differ"
        )
    return ids[0], ids[1]


@torch.no_grad()
def answer_logit_diff(
    model: torch.nn.Module, probes: ProbeSet, answer_ids: tuple[int, int], batch_size: int = 16
) -> torch.Tensor:
    """logit(pos) − logit(neg) at the last prompt token, per prompt: [n]."""
    out = []
    device = model_device(model)
    for start in range(0, len(probes), batch_size):
        batch = probes.slice(start, start + batch_size).to(device)
        # logits_to_keep=1: only the last position goes through the 49k-row unembedding.
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=batch.position_ids, use_cache=False, logits_to_keep=1,
        ).logits[:, -1].float()
        out.append(logits[:, answer_ids[0]] - logits[:, answer_ids[1]])
    return torch.cat(out).cpu()


def _tests(plus: torch.Tensor, minus: torch.Tensor) -> tuple[float, float, float]:
    """t, one-sided paired t-test p and Wilcoxon p for m_i(+1) > m_i(−1), paired over prompts."""
    import warnings

    from scipy import stats

    a, b = plus.double().numpy(), minus.double().numpy()
    d = a - b
    if len(d) < 2 or not (d != 0).any():
        return float("nan"), float("nan"), float("nan")  # no pairs or no movement at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance → nan, reported as such
        t = stats.ttest_rel(a, b, alternative="greater")
        try:
            p_w = float(stats.wilcoxon(a, b, alternative="greater").pvalue)
        except ValueError:
            p_w = float("nan")
    return float(t.statistic), float(t.pvalue), p_w


def steering_curve(
    model: torch.nn.Module,
    probes: ProbeSet,
    w: Mapping[str, torch.Tensor] | Diff,
    answer_ids: tuple[int, int],
    alphas: Sequence[float] = ALPHAS,
    *,
    threshold: float = P_THRESHOLD,
    batch_size: int = 16,
) -> SteeringCurve:
    """Margins m_i(α) for each α (weights θ + α·w, restored after each), and the paired test
    of m(+1) against m(−1) over prompts (SPEC §2.3). `alphas` must contain −1 and +1."""
    alphas = [float(a) for a in alphas]
    if -1.0 not in alphas or 1.0 not in alphas:
        raise ValueError(f"alphas {alphas} must include -1 and +1 for the steering test")
    rows = []
    for alpha in alphas:
        with weight_steer(model, w, alpha):
            rows.append(answer_logit_diff(model, probes, answer_ids, batch_size))
    margins = torch.stack(rows)  # [n_alpha, n]
    plus, minus = margins[alphas.index(1.0)], margins[alphas.index(-1.0)]
    delta = plus - minus
    t, p_t, p_w = _tests(plus, minus)
    effect = float(delta.double().mean())
    sd = margins.double().std(dim=1) if margins.shape[1] > 1 else torch.zeros(len(alphas))
    return SteeringCurve(
        alphas=alphas,
        per_prompt=[[float(x) for x in row] for row in margins],
        mean=[float(x) for x in margins.double().mean(dim=1)],
        sd=[float(x) for x in sd],
        n=int(margins.shape[1]),
        effect=effect,
        t=t,
        p_ttest=p_t,
        p_wilcoxon=p_w,
        threshold=threshold,
        steers=bool(effect > 0 and math.isfinite(p_t) and p_t < threshold),
        answer_ids=[int(answer_ids[0]), int(answer_ids[1])],
    )


def format_curve(curve: SteeringCurve | Mapping[str, Any]) -> str:
    """One line: mean margin per α, the α=+1 − α=−1 effect and both p-values."""
    c = curve if isinstance(curve, SteeringCurve) else SteeringCurve.from_json(curve)
    points = ", ".join(f"α={a:+g}: {m:+.2f}" for a, m in zip(c.alphas, c.mean, strict=True))
    return (f"mean logit(Yes)−logit(No) on {c.n} EVAL prompts: {points}; effect(+1 vs −1) "
            f"{c.effect:+.2f}, paired one-sided t-test p={c.p_ttest:.2g}, "
            f"Wilcoxon p={c.p_wilcoxon:.2g}")


def check_steers(curve: SteeringCurve | Mapping[str, Any], name: str = "diff") -> SteeringCurve:
    """Return the curve if the diff steers; raise DiffDoesNotSteerError with the curve otherwise."""
    c = curve if isinstance(curve, SteeringCurve) else SteeringCurve.from_json(curve)
    if not c.steers:
        why = ("it moves the margin the wrong way or not at all" if not c.effect > 0
               else f"the rise is not significant (p={c.p_ttest:.2g} ≥ {c.threshold})")
        raise DiffDoesNotSteerError(
            f"diff {name!r} does not steer: {why}. {format_curve(c)}. A usable diff must raise "
            f"logit(Yes)−logit(No) from α=−1 to α=+1 with one-sided paired p < {c.threshold} "
            "(SPEC §2.3); rebuild it (another recipe, more steps, a higher learning rate) or "
            "check that its sign convention is w = θ⁺ − θ⁻"
        )
    return c
