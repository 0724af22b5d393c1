"""The phases of a run that need no Hydra config (distillspec.runner reads it and calls these in order).

`Settings` holds a run's validated specs and top-level values, `Data` its tokenizer and encoded prompts;
`PhaseClock` times the phases. The phases here: load the data, load the models, train (with the served teacher
or student of rollout.engine=vllm, when configured).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from distillspec import constants as C
from distillspec.memory import peak_rss_bytes, reset_peak


@dataclasses.dataclass
class Settings:
    """A run's validated settings: the specs built from the config groups, and the top-level values."""

    stage: str
    seed: int
    resume: bool
    compare_untrained: bool  # train_eval with compare_untrained: the untrained draft is evaluated too
    snapshot: dict  # the resolved config without hydra, as given: what a rerun is compared with
    task: Any
    pair: Any
    sd: Any
    objective: Any
    rollout: Any
    train: Any
    trainer_factory: Any = None
    world_size: int = 1  # training processes (trainer devices x nodes)

    @property
    def training(self) -> bool:
        return self.stage in (C.STAGE_TRAIN, C.STAGE_TRAIN_EVAL)

    @property
    def served(self) -> bool:
        """The training process never loads the target during training (rollout.teacher_location=server)."""
        from distillspec import teacherless

        return self.training and teacherless.serves_scores(self.rollout)

    @property
    def late(self) -> bool:
        """The training process does not hold the target while it trains (served scores, or
        train.release_target): it is loaded after training for the evaluations (distillspec.teacherless)."""
        from distillspec import teacherless

        return self.training and teacherless.holds_no_target(self.rollout, self.train)

    @property
    def train_tokens(self) -> int:
        return self.train.max_new_tokens or self.task.max_new_tokens


@dataclasses.dataclass
class Data:
    """The target's tokenizer and the encoded prompts (eval_tokens: the SD evaluations' completion cap)."""

    tokenizer: Any
    train_items: list
    eval_items: list
    eval_tokens: int


class PhaseClock:
    """Wall seconds and peak resident memory per phase of this launch (logged at the end, and in metrics.json as
    phase_seconds and phase_peak_rss_gib). A phase's peak counts from the end of the one before (the first's from
    the run's start, model loading included); where the peak cannot be reset (distillspec.memory) no phase peaks
    are kept."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}
        self.start = time.perf_counter()
        self._peak = 0  # bytes: the highest phase peak so far
        self._resettable = True

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.start, 1)
        self.start = now
        peak = peak_rss_bytes()
        if peak is not None and self._resettable:
            self._resettable = reset_peak()
            self._peak = max(self._peak, peak)
            self.peak_gib[name] = round(peak / 2**30, 2)
        if not self._resettable:
            self.peak_gib.clear()

    def run_peak_bytes(self) -> int | None:
        """The run's peak RSS: the highest phase peak, or the peak since the last phase ended if higher."""
        peak = peak_rss_bytes()
        return None if peak is None else max(peak, self._peak)


def load_data(s: Settings) -> Data:
    """Prompts encoded with the target's tokenizer (errors on empty sets, and on generations that cannot fit
    the models' context, before models load)."""
    from distillspec.lit.train_loop import check_token_budgets
    from distillspec.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(s.pair.target))
    heldout_curve = s.training and s.train.eval_every and s.train.curve == "heldout"  # its prompts: eval prompts
    eval_items = s.task.encode(s.task.load("eval"), tokenizer, limit=s.sd.num_eval, seed=s.seed) \
        if s.stage != C.STAGE_TRAIN or heldout_curve else []
    train_items = s.task.encode(s.task.load("train"), tokenizer, limit=s.train.num_train, seed=s.seed) \
        if s.training else []
    check_token_budgets(s.pair, s.task, s.train, s.sd, s.rollout, train_items, eval_items)
    return Data(tokenizer, train_items, eval_items, s.sd.max_new_tokens or s.task.max_new_tokens)


def load_models(s: Settings, data: Data, device):
    """The ModelPair (a run that holds no target while training: the draft only; the target is measured in a
    child process, distillspec.teacherless)."""
    from distillspec import teacherless

    if not s.late:
        return s.pair.load(device)
    return teacherless.load_student(s.pair, device, data.train_items[0].input_ids,
                                    why=teacherless.NOT_LOADED if s.served else teacherless.RELEASED)


def curve_covers_eval(s: Settings, data: Data) -> bool:
    """The SD acceptance curve's prompts are all the eval prompts: the evaluations before and after training are
    its ends."""
    return s.train.curve == "sd" and bool(data.eval_items) and s.train.eval_num >= len(data.eval_items)


def train_phase(s: Settings, data: Data, models, loggers, run_dir: Path, device, before,
                clock: PhaseClock | None = None) -> dict[str, Any]:
    """Distil the draft (with the served teacher / student of rollout.engine=vllm); the training summary. A
    released run (train.release_target) makes its teacher data first and drops the target (a phase of its own
    on `clock`: teacher_data)."""
    from distillspec import teacherless
    from distillspec.lit.train_loop import train_draft

    covers_eval = curve_covers_eval(s, data)
    loader = teacherless.TargetLoader(s.pair, device) if s.late else None
    with served_teacher(s, data, models, run_dir, device) as engine, \
            served_student(s, data, run_dir, device) as student:
        caches = None
        if s.late and not s.served:
            caches = teacherless.teacher_data(s.rollout, models, data.train_items, device=device, seed=s.seed,
                                              temperature=s.objective.temperature, max_new_tokens=s.train_tokens,
                                              engine=engine, load_teacher=loader)
        evaluator = curve_evaluator(s, data, models, device, loader)
        if loader is not None:
            loader.release()
        if caches is not None and clock is not None:
            clock.done("teacher_data")  # made (target loaded) or read from the store
        return train_draft(models=models, task=s.task, train_items=data.train_items, eval_items=data.eval_items,
                           objective=s.objective, rollout=s.rollout, train=s.train, sd=s.sd,
                           trainer_factory=s.trainer_factory, loggers=loggers, run_dir=run_dir, seed=s.seed,
                           resume=s.resume, eval_max_new_tokens=data.eval_tokens,
                           initial_eval=before.metrics if before is not None and covers_eval else None,
                           final_eval_follows=s.stage == C.STAGE_TRAIN_EVAL and covers_eval,
                           engine=engine, student_engine=student, teacher_caches=caches, evaluator=evaluator)


def curve_evaluator(s: Settings, data: Data, models, device, load_teacher):
    """The acceptance curve's evaluator when it is not SD with the target in this process: held-out acceptance
    (train.curve=heldout; its target data made now, or loaded from the store), or SD loading the target for each
    evaluation (a released run); None: train_draft's SD evaluator."""
    from distillspec import teacherless

    if not (s.train.eval_every and data.eval_items) or (s.train.curve == "sd" and not s.late):
        return None
    items = list(data.eval_items[: s.train.eval_num])
    if s.train.curve == "sd":
        return teacherless.LateTargetSDEvaluator(s.pair, models.draft, data.tokenizer, s.sd, s.task, items,
                                                 data.eval_tokens, s.seed)
    from distillspec import heldout
    from distillspec.evaluation import eos_token_ids
    from distillspec.rollout.cache_store import default_store_dir

    cache = heldout.build_heldout(models.target, items, temperature=s.sd.temperature, top_p=s.sd.top_p,
                                  max_new_tokens=data.eval_tokens, eos_ids=eos_token_ids(data.tokenizer, models.target),
                                  pad_id=data.tokenizer.pad_token_id, device=device, seed=s.seed,
                                  batch_size=s.sd.batch_size, store=default_store_dir() if s.rollout.cache_store
                                  else None, load_teacher=load_teacher)
    return heldout.HeldoutEvaluator(models.draft, cache, temperature=s.sd.temperature, top_p=s.sd.top_p,
                                    batch_size=s.sd.batch_size)


def _engine_dtype(dtype: str, device) -> str:
    """A pair dtype for a vLLM server: "auto" is bfloat16 on CUDA, float32 elsewhere."""
    return ("bfloat16" if device.type == "cuda" else "float32") if dtype == "auto" else dtype


@contextlib.contextmanager
def served_teacher(s: Settings, data: Data, models, run_dir: Path, device):
    """The rollout engine for training (distillspec.rollout.engine): None for rollout.engine=hf; for vllm, a
    served teacher checked against the configured target before any teacher data is made."""
    from distillspec.rollout.engine import rollout_engine, verify_served_teacher

    with rollout_engine(s.rollout, target=s.pair.target, dtype=_engine_dtype(s.pair.target_dtype or s.pair.dtype,
                                                                             device),
                        run_dir=run_dir, prompt_lens=[len(it.input_ids) for it in data.train_items],
                        max_new_tokens=s.train_tokens, seed=s.seed, world_size=s.world_size,
                        verify=lambda client: verify_served_teacher(client, models.target, data.tokenizer,
                                                                    data.train_items[0].input_ids,
                                                                    s.pair.target)) as engine:
        yield engine


def served_student(s: Settings, data: Data, run_dir: Path, device):
    """The student's vLLM server for on-policy rollouts (distillspec.rollout.student_server), or None."""
    from distillspec.rollout.student_server import student_engine

    return student_engine(s.rollout, run_dir=run_dir, tokenizer=data.tokenizer,
                          dtype=_engine_dtype(s.pair.dtype, device),  # the draft's (target_dtype: the target's)
                          prompt_lens=[len(it.input_ids) for it in data.train_items],
                          batch_prompts=s.train.batch_size * s.train.accumulate, max_new_tokens=s.train_tokens,
                          seed=s.seed, world_size=s.world_size, lora_rank=s.train.lora_rank)
