"""SD evaluation over a task's prompts: run the engine (and the target-only baseline), aggregate metrics.

Plain torch (no Lightning/Hydra): used by the Lightning test loop (`lit/eval_module.py`) and by the
training module's periodic evaluation.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from distillspec import constants as C
from distillspec.sd.baseline import autoregressive_generate
from distillspec.sd.engine import SDResult, SpeculativeDecoder
from distillspec.sd.metrics import entropy_bins, per_example_metrics, sd_metrics, speedup_metrics
from distillspec.specs import SDSpec


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
    """One evaluated batch: the SD result (on CPU), baseline time, and the item indices."""

    result: SDResult
    index: torch.Tensor
    baseline_time: float | None = None
    baseline_tokens: int | None = None
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
    """

    def __init__(self, draft, target, tokenizer, spec: SDSpec, task, items: Sequence[Any],
                 max_new_tokens: int, seed: int = 0) -> None:
        self.draft, self.target, self.tokenizer = draft, target, tokenizer
        self.spec, self.task, self.items = spec, task, items
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.eos_ids = eos_token_ids(tokenizer, target)
        self.decoder = SpeculativeDecoder(
            draft, target, gamma=spec.gamma, temperature=spec.temperature, top_p=spec.top_p,
            lenience=spec.lenience, epsilon=spec.epsilon, eos_token_id=self.eos_ids,
            pad_token_id=tokenizer.pad_token_id)

    def _generator(self, device: torch.device, batch_idx: int, salt: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + batch_idx * 7 + salt)

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, torch.Tensor], batch_idx: int) -> BatchOutcome:
        """batch: input_ids (B, L), attention_mask (B, L), index (B,) on the models' device."""
        device = batch["input_ids"].device
        result = self.decoder.generate(batch["input_ids"], batch["attention_mask"], self.max_new_tokens,
                                       generator=self._generator(device, batch_idx, 0))
        outcome = BatchOutcome(result=_to_cpu(result), index=batch["index"].cpu())
        if self.spec.measure_speedup:
            base = autoregressive_generate(
                self.target, batch["input_ids"], batch["attention_mask"], self.max_new_tokens,
                temperature=self.spec.temperature, top_p=self.spec.top_p,
                generator=self._generator(device, batch_idx, 1), eos_token_id=self.eos_ids,
                pad_token_id=self.tokenizer.pad_token_id)
            outcome.baseline_time = float(base.time_total)
            outcome.baseline_tokens = int(base.lengths.sum())
        if self.spec.compute_quality and self.spec.draft_quality:
            own = autoregressive_generate(
                self.draft, batch["input_ids"], batch["attention_mask"], self.max_new_tokens,
                temperature=self.spec.temperature, top_p=self.spec.top_p,
                generator=self._generator(device, batch_idx, 2), eos_token_id=self.eos_ids,
                pad_token_id=self.tokenizer.pad_token_id)
            outcome.draft_texts = self._decode(own.tokens, own.lengths)
        return outcome

    def _decode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """(B, T) tokens, (B,) lengths -> B strings (special tokens dropped)."""
        return [self.tokenizer.decode(tokens[i, : int(lengths[i])].tolist(), skip_special_tokens=True)
                for i in range(tokens.shape[0])]

    def run(self, loader: Iterable[dict[str, torch.Tensor]], device: torch.device,
            progress: bool = True, desc: str = "SD eval") -> EvalReport:
        """Evaluate every batch of `loader` (moved to `device`) and aggregate."""
        from tqdm.auto import tqdm

        outcomes = []
        for i, batch in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False)):
            batch = {k: v.to(device) for k, v in batch.items()}
            outcomes.append(self.evaluate_batch(batch, i))
        return self.finalize(outcomes)

    def finalize(self, outcomes: Sequence[BatchOutcome]) -> EvalReport:
        """Aggregate batch outcomes into run metrics (constants' names), bins, examples."""
        result = concat_results([o.result for o in outcomes])
        index = torch.cat([o.index for o in outcomes]).tolist()
        gamma = self.spec.gamma
        metrics = dict(sd_metrics(result, gamma))
        sd_time = float(result.time_total)
        n_out = int(result.lengths.sum())
        metrics[C.SD_TOKENS_PER_S] = n_out / max(sd_time, 1e-9)
        metrics[C.NUM_EXAMPLES] = float(len(index))
        forward_time = float(result.time_draft + result.time_target)
        metrics[C.BOOKKEEPING_FRACTION] = max(0.0, 1.0 - forward_time / max(sd_time, 1e-9))
        if all(o.baseline_time is not None for o in outcomes):
            base_time = sum(o.baseline_time for o in outcomes)
            metrics[C.TARGET_TOKENS_PER_S] = sum(o.baseline_tokens for o in outcomes) / max(base_time, 1e-9)
            metrics.update(speedup_metrics(sd_time, base_time, metrics[C.BLOCK_EFFICIENCY],
                                           metrics[C.COST_RATIO], gamma))
        texts = self._decode(result.tokens, result.lengths)
        refs = [self.items[j].reference for j in index]
        if self.spec.compute_quality and refs and all(r is not None for r in refs):
            for name, value in self.task.score(texts, refs).items():
                metrics[C.QUALITY_PREFIX + name] = float(value)
            if all(o.draft_texts is not None for o in outcomes):
                own = [t for o in outcomes for t in o.draft_texts]
                for name, value in self.task.score(own, refs).items():
                    metrics[C.DRAFT_QUALITY_PREFIX + name] = float(value)
        record = _record_mask(result)
        bins = entropy_bins(result.trace_entropy, result.trace_accepted, record,
                            min_count=self.spec.entropy_min_count, hi=self.spec.entropy_bin_max)
        per_ex = per_example_metrics(result, gamma)
        for row, j in enumerate(index):
            per_ex[row]["uid"] = self.items[j].uid
        examples = [{"uid": self.items[j].uid, "prompt": self.items[j].prompt_text, "output": texts[row],
                     "reference": refs[row]} for row, j in enumerate(index[: self.spec.num_examples_logged])]
        return EvalReport(metrics=metrics, entropy_bins=bins, examples=examples, per_example=per_ex)


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
