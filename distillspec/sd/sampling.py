"""Token-level math of speculative decoding: processed distributions, sampling, block verification.

Pure torch. All probabilities are float32 whatever the model dtype. All randomness comes from a passed
`torch.Generator`. Shapes: B rows, G drafted tokens per block (gamma), V vocabulary.

Verification rules (`verify_block`):
  * "rejection" (lossless SD, Leviathan et al. 2023; lossy with a lenience f, DistillSpec 2023): accept
    drafted token x with probability min(1, f(p(x), eps) / q(x)); at the first rejection resample from
    norm(max(0, p - q)); if all G are accepted, draw one bonus token from p. f(p, eps) = p is lossless.
  * "greedy": accept x iff x == argmax p; at the first mismatch emit argmax p (exactly target greedy).
  * "topk" (SKD, Xu et al. 2024): accept x iff x is among the top-k tokens of p (with p(x) > 0); at the
    first failure emit a sample from p. `next_token` is also drawn after a fully accepted block, but
    SKD discards it there (the student proposes every token; see SpeculativeDecoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from distillspec import constants as C
from distillspec.errors import ConfigError, NonFiniteError, check_choice

LENIENCES = C.LENIENCES
ACCEPTANCE_RULES: tuple[str, ...] = ("rejection", "greedy", "topk")

_LENIENCE_FNS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "none": lambda p, eps: p,
    "p_over_eps": lambda p, eps: p / eps,
    "p_over_eps2": lambda p, eps: p / (eps * eps),
    "p_pow_eps": lambda p, eps: p.clamp_min(0.0) ** eps,
}


def lenience_fn(name: str, p: torch.Tensor, epsilon: float) -> torch.Tensor:
    """f(p, eps) for lossy SD (DistillSpec); "none" is the identity (lossless). p: any shape, float32."""
    check_choice("sd.lenience", name, LENIENCES)
    if not 0.0 < epsilon <= 1.0:
        raise ConfigError(f"sd.epsilon={epsilon!r} is invalid; valid: 0 < epsilon <= 1")
    return _LENIENCE_FNS[name](p, epsilon)


def process_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Logits (..., V) -> probabilities (..., V) float32 after temperature and nucleus (top-p) filtering.

    temperature == 0 gives the one-hot argmax distribution (greedy). The returned distribution is the one
    tokens are drawn from, and therefore the one acceptance must use.
    """
    logits = logits.float()
    if temperature == 0.0:
        probs = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        # NaN / +inf logits (-inf is a masked token) give NaN rows, as softmax would: verify_block refuses them
        broken = (logits.isnan() | (logits == float("inf"))).any(-1, keepdim=True)
        return probs.masked_fill(broken, float("nan"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        keep = nucleus_mask(probs, top_p)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


NUCLEUS_FIRST_K = 64


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(..., V) probabilities -> (..., V) bool: the smallest prefix of tokens by descending probability whose
    mass reaches top_p (always >= 1 token).

    A partial sort: look at the top k (starting at NUCLEUS_FIRST_K, x8 while any row's nucleus is longer)
    instead of sorting the whole vocabulary; the nucleus of a trained LM is usually tens of tokens of ~10^5.
    """
    V = probs.shape[-1]
    k = min(NUCLEUS_FIRST_K, V)
    while True:
        top_vals, top_idx = probs.topk(k, dim=-1)  # sorted, descending
        keep_sorted = (top_vals.cumsum(-1) - top_vals) < top_p
        if k == V or not bool(keep_sorted[..., -1].any()):
            break  # every row's nucleus ends inside the top k
        k = min(8 * k, V)
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_idx, keep_sorted)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row from probabilities (..., V) -> (...) long (inverse-CDF, one uniform each)."""
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(-1)
    u = torch.rand(flat.shape[0], 1, generator=generator, device=flat.device) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).clamp_max(flat.shape[-1] - 1)
    return tok.reshape(probs.shape[:-1])


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits / T), (..., V) -> (...) float32; T = 0 is treated as 1."""
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits.float() / t, dim=-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


@dataclass
class BlockVerdict:
    """Outcome of verifying one block per row.

    num_accepted: (B,) long, leading accepted drafted tokens n in [0, G].
    next_token: (B,) long, the token emitted after them (resample at the rejection, or the bonus token).
    accepted: (B, G) bool, per drafted position, accepted *and* all earlier ones accepted.
    first_rejected: (B, G) bool, True only at position n when n < G.
    p_tok, q_tok: (B, G) float32, p and q of each drafted token.
    accept_prob: (B, G) float32, sum_v min(p(v), q(v)) = 1 - TV(p, q) per position (the rule's
        expected acceptance: for "greedy" 1 if the argmaxes agree, for "topk" q's mass on p's top-k).
    """

    num_accepted: torch.Tensor
    next_token: torch.Tensor
    accepted: torch.Tensor
    first_rejected: torch.Tensor
    p_tok: torch.Tensor
    q_tok: torch.Tensor
    accept_prob: torch.Tensor


def _topk_members(p: torch.Tensor, k: int) -> torch.Tensor:
    """(..., V) bool: token is among the top-k of p and has p > 0."""
    k = min(k, p.shape[-1])
    thresh = p.topk(k, dim=-1).values[..., -1:]
    return (p >= thresh) & (p > 0)


def _topk_by_rank(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., V) bool: token is among the k highest scores (ties at the threshold included)."""
    k = min(k, scores.shape[-1])
    return scores >= scores.topk(k, dim=-1).values[..., -1:]


def check_finite_probs(p: torch.Tensor, q: torch.Tensor) -> None:
    """Raise NonFiniteError if the target's (p) or the draft's (q) probabilities hold NaN/inf.

    A NaN compares false everywhere, so without this a NaN draft distribution is 'accepted' at every position
    (alpha_tok 1.0 for a broken draft). One host sync per block.
    """
    bad = torch.stack([~torch.isfinite(p).all(), ~torch.isfinite(q).all()]).tolist()
    if any(bad):
        who = " and ".join(w for w, b in zip(("target (p)", "draft (q)"), bad) if b)
        raise NonFiniteError(f"non-finite {who} probabilities in SD verification: the model's logits hold NaN/inf, "
                             "so no acceptance can be computed (a diverged or broken draft? check its weights and "
                             "pair.dtype)")


def verify_block(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor, *, rule: str = "rejection",
                 generator: torch.Generator | None = None, lenience: str = "none", epsilon: float = 1.0,
                 top_k: int = 25, rank_scores: torch.Tensor | None = None) -> BlockVerdict:
    """Verify a drafted block for every row.

    Args:
        p: (B, G+1, V) target probabilities (processed), position j scores drafted token j; p[:, G] is
            the bonus distribution. q: (B, G, V) draft probabilities the drafted tokens were sampled from.
        draft_tokens: (B, G) long. rule: one of ACCEPTANCE_RULES. generator: randomness for accept tests
            and resampling. lenience, epsilon: lossy SD (rule "rejection" only). top_k: for rule "topk".
        rank_scores: (B, G+1, V) scores ranking the target's tokens for "topk" (e.g. its raw logits, so the
            top-k set does not collapse to one token at temperature 0); defaults to p.
    """
    check_choice("acceptance rule", rule, ACCEPTANCE_RULES)
    p, q = p.float(), q.float()
    check_finite_probs(p, q)
    B, G = draft_tokens.shape
    p_blk = p[:, :G]
    idx = draft_tokens.unsqueeze(-1)
    p_tok = p_blk.gather(-1, idx).squeeze(-1)
    q_tok = q.gather(-1, idx).squeeze(-1)
    if rule == "greedy":
        target_arg = p.argmax(-1)  # (B, G+1)
        ok = draft_tokens == target_arg[:, :G]
        accept_prob = (q.argmax(-1) == target_arg[:, :G]).float()
    elif rule == "topk":
        scores = p_blk if rank_scores is None else rank_scores[:, :G].float()
        members = _topk_members(scores, top_k) if rank_scores is None else _topk_by_rank(scores, top_k)
        ok = members.gather(-1, idx).squeeze(-1)
        accept_prob = (q * members).sum(-1)
    else:
        u = torch.rand(B, G, generator=generator, device=p.device)
        f = lenience_fn(lenience, p_tok, epsilon)
        ratio = torch.where(q_tok > 0, f / q_tok.clamp_min(1e-30), torch.ones_like(q_tok))
        ok = u < ratio.clamp(max=1.0)
        accept_prob = torch.minimum(p_blk, q).sum(-1)
    accepted = ok.long().cumprod(-1).bool()
    n = accepted.sum(-1)
    first_rejected = torch.zeros_like(accepted)
    rows = torch.arange(B, device=p.device)
    has_rej = n < G
    first_rejected[rows[has_rej], n[has_rej]] = True
    # distribution of the token after the accepted prefix
    p_next = p[rows, n]  # (B, V)
    if rule == "greedy":
        next_token = p_next.argmax(-1)
    else:
        if rule == "rejection":
            q_next = q[rows, n.clamp_max(G - 1)]
            resid = (p_next - q_next).clamp_min(0.0)
            mass = resid.sum(-1, keepdim=True)
            # p == q leaves no residual mass; a rejection then has probability 0 (only rounding), use p.
            resid = torch.where(mass > 0, resid, p_next)
            dist = torch.where(has_rej[:, None], resid, p_next)
        else:
            dist = p_next
        next_token = sample(dist, generator)
    return BlockVerdict(num_accepted=n, next_token=next_token, accepted=accepted, first_rejected=first_rejected,
                        p_tok=p_tok, q_tok=q_tok, accept_prob=accept_prob)
