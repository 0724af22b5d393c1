"""SD evaluation over a task's prompts: run the engine (and the target-only baseline), aggregate metrics.

Plain torch (no Lightning/Hydra). `SDEvaluator.run` is the one evaluation path: training's periodic evaluations,
the untrained draft's, the final one (`runner.evaluate`) and the vLLM check's recomputation
(`serving.ours.run_ours`, through `SDEvaluator.outcomes`) all go through it, so the same draft, prompts, settings
and seed give the same numbers whoever asks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.memory import trim_heap
from distillspec.sd.baseline import autoregressive_generate
from distillspec.sd.engine import SDResult, SpeculativeDecoder
from distillspec.sd.metrics import choose_gamma, entropy_bins, per_example_metrics, sd_metrics, verify_cost_ratio
from distillspec.sd.timing import RoundTimes, median_round, speed_metrics, sum_rounds
from distillspec.specs import AUTO_GAMMA, SDSpec

log = logging.getLogger("distillspec")

WARMUP_TOKENS = 8       # warm-up generation (both paths, first batch of each pass) before anything is timed
AUTO_GAMMA_PILOT = 4    # sd.gamma=auto: gamma of the pilot SD run that measures alpha, c and v
AUTO_GAMMA_MAX = 10     # ... and the largest gamma it may choose
PILOT_TOKENS = 32       # new tokens of the pilot runs (capped at max_new_tokens)
QUALITY_CUT_LIMIT = C.QUALITY_CUT_LIMIT


def concat_results(results: Sequence[SDResult]) -> SDResult:
    """Concatenate per-batch SDResults into one (rows stacked; trace rows re-indexed; timings summed)."""
    if len(results) == 1:
        return results[0]
    out: dict[str, Any] = {}
    offsets = torch.tensor([0] + [r.lengths.shape[0] for r in results[:-1]]).cumsum(0)
    for f in dataclasses.fields(SDResult):
        vals = [getattr(r, f.name) for r in results]
        if isinstance(vals[0], torch.Tensor):
            if f.name == "trace_row":
                vals = [v + int(o) for v, o in zip(vals, offsets)]
            if vals[0].dim() == 2:  # (B, T) token blocks: pad to the widest
                width = max(v.shape[1] for v in vals)
                pad = int(results[0].pad_token_id)
                vals = [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=pad) for v in vals]
            out[f.name] = torch.cat(vals, 0)
        elif f.name == "pad_token_id":
            out[f.name] = vals[0]
        elif isinstance(vals[0], (int, float)) and not isinstance(vals[0], bool):
            out[f.name] = sum(vals)
        else:
            out[f.name] = vals[0]
    return SDResult(**out)


@dataclass
class BatchOutcome:
    """One evaluated batch: the SD result (on CPU), the item indices, one RoundTimes per timed round."""

    result: SDResult
    index: torch.Tensor
    rounds: list[RoundTimes] = field(default_factory=list)
    baseline_tokens: int | None = None
    baseline_outputs: list[list[int]] | None = None  # target-only tokens per row (first round; EOS included)
    draft_texts: list[str] | None = None  # draft-only generations (sd.draft_quality)


@dataclass
class EvalReport:
    """Aggregated evaluation: scalar metrics, entropy bins, example generations, per-example metrics."""

    metrics: dict[str, float]
    entropy_bins: list[dict[str, float]] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    per_example: list[dict[str, Any]] = field(default_factory=list)


def _to_cpu(result: SDResult) -> SDResult:
    return dataclasses.replace(result, **{f.name: getattr(result, f.name).cpu()
                                          for f in dataclasses.fields(result)
                                          if isinstance(getattr(result, f.name), torch.Tensor)})


class SDEvaluator:
    """Evaluates a draft against a target with batched SD on encoded task prompts.

    Args:
        draft, target: HF causal LMs (same vocabulary), already on their device.
        tokenizer: shared tokenizer (for decoding outputs and EOS/pad ids).
        spec: SD settings. task: the task (for `score`). items: encoded prompts (`.input_ids`, `.reference`).
        max_new_tokens: tokens to generate per prompt. seed: base seed (batch i uses seed + i).
        speed_repeats: timed rounds per batch (default spec.speed_repeats; periodic training evals pass 1).
        baseline_first: round 0 runs target-only before SD (rounds alternate the order either way).

    Timing protocol (measure_speedup): on the first batch of a pass both paths are warmed up (a
    WARMUP_TOKENS generation; sd.speed_warmup), then each batch runs `speed_repeats` rounds of SD and
    target-only on the same prompts, alternating which goes first; see `distillspec.sd.timing`. With
    sd.gamma=auto a pilot on the first batch measures alpha, c and v at AUTO_GAMMA_PILOT and sets gamma
    to `choose_gamma`'s pick (recorded as sd/gamma).
    """

    def __init__(self, draft, target, tokenizer, spec: SDSpec, task, items: Sequence[Any],
                 max_new_tokens: int, seed: int = 0, speed_repeats: int | None = None,
                 baseline_first: bool = False, kv: str | None = None) -> None:
        self.draft, self.target, self.tokenizer = draft, target, tokenizer
        # KV cache of SD and target-only decoding ("dynamic" or "static"; sd.engine): spec.kv unless given
        self.kv = spec.kv if kv is None else kv
        self.compile = spec.compile
        self.spec, self.task, self.items = spec, task, items
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.speed_repeats = spec.speed_repeats if speed_repeats is None else int(speed_repeats)
        if self.speed_repeats < 1:
            raise ConfigError(f"speed_repeats={self.speed_repeats} is invalid; valid: >= 1")
        self.baseline_first = baseline_first
        self.auto_gamma = spec.gamma == AUTO_GAMMA
        self.eos_ids = eos_token_ids(tokenizer, target)
        self.decoder = SpeculativeDecoder(
            draft, target, gamma=AUTO_GAMMA_PILOT if self.auto_gamma else spec.gamma,
            temperature=spec.temperature, top_p=spec.top_p,
            lenience=spec.lenience, epsilon=spec.epsilon, eos_token_id=self.eos_ids,
            pad_token_id=tokenizer.pad_token_id, kv=self.kv, compile=self.compile, first_token=spec.first_token)

    def _generator(self, device: torch.device, batch_idx: int, salt: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + batch_idx * 7 + salt)

    def _baseline(self, model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, generator):
        return autoregressive_generate(model, ids, mask, new_tokens, temperature=self.spec.temperature,
                                       top_p=self.spec.top_p, generator=generator, eos_token_id=self.eos_ids,
                                       pad_token_id=self.tokenizer.pad_token_id, kv=self.kv,
                                       compile=self.compile)

    def _warm_up(self, ids: torch.Tensor, mask: torch.Tensor, batch_idx: int) -> None:
        """Short untimed generations of both paths: one-time costs (allocator, first kernels) land here."""
        n = min(WARMUP_TOKENS, self.max_new_tokens)
        self.decoder.generate(ids, mask, n, generator=self._generator(ids.device, batch_idx, 5))
        if self.spec.measure_speedup or self.auto_gamma:
            self._baseline(self.target, ids, mask, n, self._generator(ids.device, batch_idx, 6))

    def _choose_gamma(self, ids: torch.Tensor, mask: torch.Tensor, batch_idx: int) -> None:
        """sd.gamma=auto: pilot SD (gamma AUTO_GAMMA_PILOT) and target-only runs -> alpha, c_step, v -> gamma."""
        n = min(PILOT_TOKENS, self.max_new_tokens)
        self.decoder.gamma = AUTO_GAMMA_PILOT
        sd = self.decoder.generate(ids, mask, n, generator=self._generator(ids.device, batch_idx, 3))
        base = self._baseline(self.target, ids, mask, n, self._generator(ids.device, batch_idx, 4))
        alpha = sd_metrics(sd, AUTO_GAMMA_PILOT)[C.ALPHA_EXPECTED]
        step_calls = max(base.num_calls - 1, 0)
        step = (base.time_forward - base.time_prefill) / step_calls if step_calls else float("nan")
        cost_step = sd.time_draft / max(sd.num_draft_calls, 1) / step
        v = verify_cost_ratio(sd.time_target, sd.num_target_calls, base.time_forward - base.time_prefill, step_calls)
        try:
            self.decoder.gamma = choose_gamma(alpha, cost_step, v, AUTO_GAMMA_PILOT, AUTO_GAMMA_MAX)
        except ValueError as exc:
            log.warning("sd.gamma=auto: %s; keeping gamma=%d", exc, AUTO_GAMMA_PILOT)
        log.info("sd.gamma=auto: alpha=%.3f c_step=%.3f v=%.3f -> gamma=%d", alpha, cost_step, v, self.decoder.gamma)

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, torch.Tensor], batch_idx: int) -> BatchOutcome:
        """batch: input_ids (B, L), attention_mask (B, L), index (B,) on the models' device."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        device = ids.device
        if batch_idx == 0:  # a new pass (the draft may have changed since the last one)
            if self.spec.speed_warmup and (self.spec.measure_speedup or self.auto_gamma):  # only timing needs it
                self._warm_up(ids, mask, batch_idx)
            if self.auto_gamma:
                self._choose_gamma(ids, mask, batch_idx)
        timed = self.spec.measure_speedup
        result, rounds, base_out = None, [], None
        for r in range(self.speed_repeats if timed else 1):
            base_first = timed and (r + int(self.baseline_first)) % 2 == 1
            base = None
            if base_first:
                base = self._baseline(self.target, ids, mask, self.max_new_tokens, self._generator(device, batch_idx, 1))
            sd = self.decoder.generate(ids, mask, self.max_new_tokens, generator=self._generator(device, batch_idx, 0))
            if timed and not base_first:
                base = self._baseline(self.target, ids, mask, self.max_new_tokens, self._generator(device, batch_idx, 1))
            rounds.append(RoundTimes.of(sd, base))
            if result is None:  # same seeds every round: the same outputs; keep the first
                result = sd
                base_out = None if base is None else [base.tokens[i, : int(base.lengths[i])].tolist()
                                                      for i in range(base.tokens.shape[0])]
        outcome = BatchOutcome(result=_to_cpu(result), index=batch["index"].cpu(), rounds=rounds,
                               baseline_tokens=None if base_out is None else sum(map(len, base_out)),
                               baseline_outputs=base_out)
        if self.spec.compute_quality and self.spec.draft_quality:
            own = self._baseline(self.draft, ids, mask, self.max_new_tokens, self._generator(device, batch_idx, 2))
            outcome.draft_texts = self._decode(own.tokens, own.lengths)
        trim_heap()  # this batch's caches and logits, freed, go back to the OS (outside the timed calls)
        return outcome

    def _decode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """(B, T) tokens, (B,) lengths -> B strings (special tokens dropped)."""
        return [self.tokenizer.decode(tokens[i, : int(lengths[i])].tolist(), skip_special_tokens=True)
                for i in range(tokens.shape[0])]

    def batches(self) -> Iterable[dict[str, torch.Tensor]]:
        """The prompts in order, spec.batch_size per batch (the batch index seeds its sampling): input_ids (B, L),
        attention_mask (B, L) left-padded, index (B,) into `items`."""
        from distillspec.lit.data import prompt_loader

        return prompt_loader(self.items, self.spec.batch_size, self.tokenizer.pad_token_id)

    def outcomes(self, device: torch.device, progress: bool = True, desc: str = "SD eval",
                 leave: bool = False) -> list[BatchOutcome]:
        """`evaluate_batch` over every batch of `batches()` (moved to `device`) in `evaluation_mode`; a progress bar
        named `desc` (kept on screen when done with `leave`)."""
        from tqdm.auto import tqdm

        with evaluation_mode(device, self.draft, self.target):
            return [self.evaluate_batch({k: v.to(device) for k, v in batch.items()}, i)
                    for i, batch in enumerate(tqdm(self.batches(), desc=desc, disable=not progress, leave=leave))]

    def run(self, device: torch.device, progress: bool = True, desc: str = "SD eval", leave: bool = False) -> EvalReport:
        """Evaluate every prompt (`outcomes`) and aggregate (`finalize`)."""
        return self.finalize(self.outcomes(device, progress, desc, leave))

    def finalize(self, outcomes: Sequence[BatchOutcome]) -> EvalReport:
        """Aggregate batch outcomes into run metrics (constants' names), bins, examples."""
        result = concat_results([o.result for o in outcomes])
        index = torch.cat([o.index for o in outcomes]).tolist()
        gamma = self.decoder.gamma
        rounds = sum_rounds([o.rounds for o in outcomes])
        timed = all(o.baseline_tokens is not None for o in outcomes)
        med = median_round(rounds, "sd_total")
        # c and tokens/s from the median SD round, the same one whose phase split is recorded
        result = dataclasses.replace(result, time_total=med.sd_total, time_draft=med.sd_draft,
                                     time_target=med.sd_target, time_prefill=med.sd_prefill,
                                     num_draft_calls=med.sd_draft_calls, num_target_calls=med.sd_target_calls)
        metrics = dict(sd_metrics(result, gamma))
        metrics[C.GAMMA] = float(gamma)
        n_out = int(result.lengths.sum())
        metrics[C.NUM_EXAMPLES] = float(len(index))
        metrics.update(speed_metrics(rounds, metrics[C.BLOCK_EFFICIENCY], metrics[C.COST_RATIO], gamma, timed))
        metrics[C.SD_TOKENS_PER_S] = n_out / max(metrics[C.SD_TIME], 1e-9)
        if timed:
            base_tokens = sum(o.baseline_tokens for o in outcomes)
            metrics[C.TARGET_TOKENS_PER_S] = base_tokens / max(metrics[C.TARGET_TIME], 1e-9)
        metrics[C.TRUNCATED_FRACTION] = self._truncated(result).float().mean().item()
        texts = self._decode(result.tokens, result.lengths)
        refs = [self.items[j].reference for j in index]
        if self.spec.compute_quality and refs and all(r is not None for r in refs):
            for name, value in self.task.score(texts, refs).items():
                metrics[C.QUALITY_PREFIX + name] = float(value)
            if all(o.draft_texts is not None for o in outcomes):
                own = [t for o in outcomes for t in o.draft_texts]
                for name, value in self.task.score(own, refs).items():
                    metrics[C.DRAFT_QUALITY_PREFIX + name] = float(value)
        cut = self._answer_cut(texts, result)
        if cut is not None:
            metrics[C.ANSWER_CUT_FRACTION] = cut
        record = _record_mask(result)
        bins = entropy_bins(result.trace_entropy, result.trace_accepted, record,
                            min_count=self.spec.entropy_min_count, hi=self.spec.entropy_bin_max)
        per_ex = per_example_metrics(result, gamma)
        for row, j in enumerate(index):
            per_ex[row]["uid"] = self.items[j].uid
        examples = [{"uid": self.items[j].uid, "prompt": self.items[j].prompt_text, "output": texts[row],
                     "reference": refs[row]} for row, j in enumerate(index[: self.spec.num_examples_logged])]
        return EvalReport(metrics=metrics, entropy_bins=bins, examples=examples, per_example=per_ex)

    def _truncated(self, result: SDResult) -> torch.Tensor:
        """(B,) bool: outputs that stopped at max_new_tokens without an EOS."""
        last = result.tokens.gather(1, (result.lengths - 1).clamp(min=0)[:, None])[:, 0]
        return (result.lengths >= self.max_new_tokens) & ~torch.isin(last, torch.tensor(self.eos_ids))

    def _answer_cut(self, texts: Sequence[str], result: SDResult) -> float | None:
        """Fraction of outputs cut at max_new_tokens before the task's final answer (None: the task has no
        final answer). Above QUALITY_CUT_LIMIT the quality metric measures truncation: a warning says so and
        the run's summary does not show it as a result."""
        has_answer = getattr(self.task, "has_final_answer", None)
        if has_answer is None or not texts:
            return None
        cut = self._truncated(result).tolist()
        missing = sum(1 for t, c in zip(texts, cut) if c and not has_answer(t))
        if missing > len(texts) * QUALITY_CUT_LIMIT:
            log.warning("%d of %d outputs end at max_new_tokens=%d without a final answer, so the task's quality "
                        "metric mostly measures truncation; raise sd.max_new_tokens (or task.max_new_tokens)",
                        missing, len(texts), self.max_new_tokens)
        return missing / len(texts)


@contextlib.contextmanager
def evaluation_mode(device: torch.device, *models: torch.nn.Module):
    """`models` in eval mode with every weight frozen (each put back as it was afterwards), no gradients, autocast
    off on `device`: an evaluation computes the same numbers whoever calls it.

    Frozen: torch's matmul picks its kernel for a non-contiguous input (the last position of the hidden states
    that the LM head reads) by whether the weight requires grad, also under no_grad, so a trainable draft and the
    same draft loaded frozen differ in the last bits of their logits, and at T > 0 now and then in a sampled
    token. Autocast off: the models run in their own dtypes, also inside a Lightning step under mixed precision.
    """
    was_training = [m.training for m in models]
    trainable = [p for m in models for p in m.parameters() if p.requires_grad]
    for m in models:
        m.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for m, mode in zip(models, was_training):
            m.train(mode)


def _record_mask(result: SDResult) -> torch.Tensor:
    """Positions kept for entropy binning: every accepted one and the first rejected one per block."""
    return result.trace_accepted | result.trace_first_rejected


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """All EOS ids: the tokenizer's plus the model's generation_config ones (e.g. <|im_end|>)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    for e in ([extra] if isinstance(extra, int) else list(extra or [])):
        if int(e) not in ids:
            ids.append(int(e))
    if not ids:
        raise ValueError("the tokenizer and model define no EOS token")
    return ids


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """(fn(*args, **kwargs), seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
