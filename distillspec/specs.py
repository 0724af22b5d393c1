"""Typed, validated run settings that Hydra instantiates from the config groups (`_target_`).

Each spec validates itself on construction, so bad input fails before any model is loaded. Code below
the entry point receives these objects (or plain values from them), never a Hydra/OmegaConf config.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from distillspec.errors import ConfigError, check_choice, check_number, check_range, check_temperature
from distillspec.constants import (CURVES, ENTROPY_BIN_LO, FIRST_TOKEN_MODES, LENIENCES,
                                   ROLLOUT_ENGINE_VLLM, ROLLOUT_ENGINES, TEACHER_LOCATIONS, TEACHER_SERVED)

ROLLOUT_SOURCES = ("fixed", "student", "teacher", "mixed", "skd")
MIX_SOURCES = ("fixed", "student", "teacher")
MIX_TOLERANCE = 1e-6  # rollout.mix fractions must sum to 1 within this
GATE_MODES = ("greedy", "sampled", "ratio")
TEACHER_LOGITS = ("sparse", "dense")
AUTO_GAMMA = "auto"  # sd.gamma=auto: chosen from measured alpha, c and v (SDEvaluator)


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (specs hold plain Python values only)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def check_field_types(spec: Any, prefix: str) -> None:
    """ConfigError for any field whose value does not match its annotated scalar type.

    Covers every `float`, `int`, `bool` and `str` field (optionally `| None`) of a dataclass spec, so a
    new field is checked too: floats must be finite numbers (ints are converted to float), ints must be
    ints; bools are neither. The message names the field (`train.lr='abc' is not a finite number`).
    """
    hints = typing.get_type_hints(type(spec))
    for f in fields(spec):
        hint, value = hints[f.name], getattr(spec, f.name)
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        optional = type(None) in args
        scalar = [a for a in args if a is not type(None)]
        if len(scalar) != 1 or scalar[0] not in (float, int, bool, str) or (optional and value is None):
            continue
        kind, name = scalar[0], f"{prefix}.{f.name}"
        if kind is float:
            check_number(name, value)
            setattr(spec, f.name, float(value))
        elif kind is int:
            check_number(name, value, integer=True)
        elif not isinstance(value, kind):
            raise ConfigError(f"{name}={value!r} is not a {kind.__name__} (got {type(value).__name__})"
                              + ("; valid: true or false" if kind is bool else ""))


def _check_sampling(prefix: str, temperature: float, top_p: float) -> None:
    check_temperature(f"{prefix}.temperature", temperature)
    check_range(f"{prefix}.top_p", top_p, lo=0.0, hi=1.0, lo_open=True)


@dataclass
class SDSpec:
    """Speculative-decoding evaluation settings (conf/sd/)."""

    gamma: int | str
    temperature: float
    top_p: float
    lenience: str
    epsilon: float
    num_eval: int
    batch_size: int
    max_new_tokens: int | None
    measure_speedup: bool
    compute_quality: bool
    draft_quality: bool
    entropy_min_count: int
    entropy_bin_max: float
    num_examples_logged: int
    speed_repeats: int
    speed_warmup: bool
    kv: str
    compile: bool
    first_token: str

    def __post_init__(self) -> None:
        from distillspec.constants import KV_MODES

        check_field_types(self, "sd")
        check_choice("sd.kv", self.kv, KV_MODES)
        check_choice("sd.first_token", self.first_token, FIRST_TOKEN_MODES)
        if self.compile and self.kv != "static":
            raise ConfigError(f"sd.compile=true needs sd.kv=static (fixed call shapes); got sd.kv={self.kv!r}")
        if self.gamma != AUTO_GAMMA and (not isinstance(self.gamma, int) or self.gamma < 1):
            raise ConfigError(f"sd.gamma={self.gamma!r} is invalid; valid: an integer >= 1 or {AUTO_GAMMA!r}")
        _check_sampling("sd", self.temperature, self.top_p)
        check_choice("sd.lenience", self.lenience, LENIENCES)
        check_range("sd.epsilon", self.epsilon, lo=0.0, hi=1.0, lo_open=True)
        for name in ("num_eval", "batch_size", "speed_repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sd.{name}={getattr(self, name)!r} is invalid; valid: >= 1")
        if not self.entropy_bin_max > ENTROPY_BIN_LO:
            raise ConfigError(f"sd.entropy_bin_max={self.entropy_bin_max!r} is invalid; "
                              f"valid: > {ENTROPY_BIN_LO} (nats)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"sd.max_new_tokens={self.max_new_tokens!r} is invalid; valid: >= 1 or null")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GateSpec:
    """SpecKD loss gating (distillspec.losses.gating.speckd_gate)."""

    top_k: int
    mode: str
    num_candidates: int
    beta: float

    def __post_init__(self) -> None:
        check_field_types(self, "div.gate")
        check_choice("div.gate.mode", self.mode, GATE_MODES)
        if self.top_k < 1 or self.num_candidates < 1:
            raise ConfigError(f"div.gate.top_k={self.top_k} and num_candidates={self.num_candidates} must be >= 1")
        check_range("div.gate.beta", self.beta, lo=0.0, hi=1.0)


@dataclass
class ObjectiveSpec:
    """The distillation objective (conf/div/): a token-level divergence, optionally SpecKD-gated.

    adaptive: the beta schedule of divergence "adaptive" (distillspec.losses.adaptive.BetaSchedule, from a
    mapping; its defaults when null). block_weighting: "none", "block" or "block_avg" (weight each token by the
    detached probability of reaching it in a block_gamma-token SD block; any divergence).
    """

    divergence: str
    temperature: float
    beta: float
    alpha: float
    chunk_size: int | None
    gate: GateSpec | Mapping[str, Any] | None
    adaptive: Any
    block_weighting: str
    block_gamma: int

    def __post_init__(self) -> None:
        from distillspec.constants import DIVERGENCES

        check_field_types(self, "div")
        check_choice("div.divergence", self.divergence, DIVERGENCES)
        check_temperature("div.temperature", self.temperature, allow_zero=False)
        check_range("div.beta", self.beta, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_range("div.alpha", self.alpha, lo=0.0, hi=1.0, hi_open=True)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"div.chunk_size={self.chunk_size!r} is invalid; valid: >= 1 or null")
        gate = _plain(self.gate)
        if isinstance(gate, Mapping):
            names = [f.name for f in fields(GateSpec)]
            missing, unknown = [n for n in names if n not in gate], sorted(set(gate) - set(names))
            if missing or unknown:
                raise ConfigError(f"div.gate={gate!r} needs exactly {', '.join(names)} (missing: {missing or 'none'}, "
                                  f"unknown: {unknown or 'none'}); div=speckd sets them all, override div.gate.<key>")
            self.gate = GateSpec(**gate)
        self._post_init_adaptive()

    @property
    def needs_dense_teacher(self) -> bool:
        """True when the loss needs the teacher's full next-token distributions, not a top-k of them: a SpecKD
        gate (teacher top-k membership of the student's proposal), the adaptive divergence (per-token teacher
        entropy), block-aware weighting (per-position 1 - TV)."""
        return self.gate is not None or self.divergence == "adaptive" or self.block_weighting != "none"

    def _post_init_adaptive(self) -> None:
        from distillspec.constants import BLOCK_WEIGHTINGS

        check_choice("div.block_weighting", self.block_weighting, BLOCK_WEIGHTINGS)
        if isinstance(self.block_gamma, bool) or not isinstance(self.block_gamma, int) or self.block_gamma < 1:
            raise ConfigError(f"div.block_gamma={self.block_gamma!r} is invalid; valid: an integer >= 1")
        adaptive = _plain(self.adaptive)
        if adaptive is not None and self.divergence != "adaptive":
            raise ConfigError(f"div.adaptive is set but div.divergence={self.divergence!r}; the beta schedule "
                              "applies only to divergence 'adaptive' (div=adaptive)")
        if self.divergence == "adaptive":
            from distillspec.losses.adaptive import BetaSchedule  # torch: only adaptive runs pay its import here

            if adaptive is None:
                adaptive = BetaSchedule()
            elif isinstance(adaptive, Mapping):
                try:
                    adaptive = BetaSchedule(**adaptive)
                except TypeError as exc:
                    raise ConfigError(f"invalid div.adaptive settings: {exc}") from None
            elif not isinstance(adaptive, BetaSchedule):
                raise ConfigError(f"div.adaptive={adaptive!r} is invalid; valid: a mapping of BetaSchedule fields")
            self.adaptive = adaptive


@dataclass
class RolloutSpec:
    """Where training sequences come from (conf/rollout/; DistillSpec Alg. A.2, plus SKD)."""

    source: str
    mix: Mapping[str, float] | None
    temperature: float
    top_p: float
    skd_top_k: int
    skd_gamma: int
    cache_top_k: int  # teacher/fixed data: cache teacher completions + top-k log-probs once (0: off)
    cache_batch_size: int  # prompts per teacher decoding batch
    cache_store: bool  # keep that teacher data on disk (distillspec cache dir) for identical jobs to reuse
    # cached data: "sparse" trains on the stored top-k teacher (student alone runs); "dense" reuses the cached
    # completions but runs the teacher on them every step for its full distributions (objectives that need
    # them, ObjectiveSpec.needs_dense_teacher, always do)
    teacher_logits: str
    # who makes the teacher data (teacher samples, scores of dataset outputs): "hf" = this process's decoding
    # loop; "vllm" = a vLLM server (distillspec.rollout.engine): vllm_url's, else one started from the serving
    # env (vllm_python, default .venv-vllm) on vllm_port (null: a free one) with extra `vllm serve` vllm_args
    engine: str
    vllm_url: str | None
    vllm_port: int | None
    vllm_python: str | None
    vllm_args: Sequence[str]
    # with engine=vllm, student rollouts come from a vLLM server holding the student; its weights are reloaded
    # from the trained student every vllm_sync_every optimizer steps (1: every step, on-policy)
    vllm_sync_every: int
    # who scores on-policy (student) data: "process" = the teacher loaded in the training process; "server" =
    # the vLLM teacher server's top-cache_top_k prompt log-probs (sparse), so training never loads the teacher
    teacher_location: str

    def __post_init__(self) -> None:
        check_field_types(self, "rollout")
        self._check_engine()
        check_choice("rollout.source", self.source, ROLLOUT_SOURCES)
        check_choice("rollout.teacher_logits", self.teacher_logits, TEACHER_LOGITS)
        if self.cache_top_k < 0 or self.cache_batch_size < 1:
            raise ConfigError(f"rollout.cache_top_k={self.cache_top_k!r} (valid: >= 0, 0 = no cache) and "
                              f"rollout.cache_batch_size={self.cache_batch_size!r} (valid: >= 1)")
        _check_sampling("rollout", self.temperature, self.top_p)
        if self.source != "mixed" and _plain(self.mix) is not None:  # e.g. +rollout.mix.student=0.9 on rollout=student
            raise ConfigError(f"rollout.mix={_plain(self.mix)} is set but rollout.source={self.source!r}; the mix "
                              "applies only to rollout.source=mixed (select rollout=mixed, then set "
                              "rollout.mix.<fixed|student|teacher>), or drop rollout.mix")
        if self.source == "mixed":
            mix = dict(_plain(self.mix) or {})
            for key, value in mix.items():
                check_choice("rollout.mix source", key, MIX_SOURCES)
                check_number(f"rollout.mix.{key}", value)
            total = sum(mix.values())
            if any(not 0 <= v <= 1 for v in mix.values()) or abs(total - 1) > MIX_TOLERANCE:
                raise ConfigError(f"rollout.mix={mix} is invalid (sum {total:g}); valid: fractions in [0, 1] of "
                                  f"{', '.join(MIX_SOURCES)} summing to 1 (within {MIX_TOLERANCE:g} of 1), e.g. "
                                  "rollout.mix.student=0.75 rollout.mix.teacher=0.25 rollout.mix.fixed=0")
            self.mix = {k: float(v) for k, v in mix.items()}
        if self.skd_top_k < 1 or self.skd_gamma < 1:
            raise ConfigError(f"rollout.skd_top_k={self.skd_top_k} and skd_gamma={self.skd_gamma} must be >= 1")
        if self.engine == ROLLOUT_ENGINE_VLLM:
            self._check_vllm_sources()
        self._check_teacher_location()

    def _check_engine(self) -> None:
        check_choice("rollout.engine", self.engine, ROLLOUT_ENGINES)
        if self.vllm_url is not None and not self.vllm_url.startswith(("http://", "https://")):
            raise ConfigError(f"rollout.vllm_url={self.vllm_url!r} is not an http(s) URL; valid: http://host:port "
                              "or null (start a server here)")
        if self.vllm_port is not None and not 1 <= self.vllm_port <= 65535:
            raise ConfigError(f"rollout.vllm_port={self.vllm_port!r} is out of range; valid: 1..65535, or null "
                              "(a free port)")
        self.vllm_args = [str(a) for a in _plain(self.vllm_args) or ()]

    def used_sources(self) -> list[str]:
        """The sources this spec draws batches from (the mixture's non-zero parts, or the one source)."""
        return [k for k, v in self.mix.items() if v > 0] if self.source == "mixed" else [self.source]

    def serves_teacher_logprobs(self) -> bool:
        """Whether the loss trains on log-probs from the vLLM teacher server (teacher data, or on-policy scores)."""
        return self.engine == ROLLOUT_ENGINE_VLLM and (self.teacher_location == TEACHER_SERVED or any(
            s in ("teacher", "fixed") for s in self.used_sources()))

    def _check_vllm_sources(self) -> None:
        """rollout.engine=vllm: teacher data (teacher samples, dataset-output scores) from a vLLM teacher server
        through the teacher cache (cache_top_k > 0), student rollouts from a vLLM server holding the student
        (synced every vllm_sync_every steps); SKD interleaves the two models token by token in this process."""
        if self.source == "skd":
            raise ConfigError("rollout.source='skd' with rollout.engine=vllm: SKD interleaves the student and the "
                              "teacher token by token in this process, which a server cannot do; valid with vllm: "
                              "rollout=student, teacher, fixed or mixed; for SKD use rollout.engine=hf")
        if self.cache_top_k == 0 and any(s in ("teacher", "fixed") for s in self.used_sources()):
            raise ConfigError("rollout.engine=vllm makes teacher data through the teacher cache, but "
                              "rollout.cache_top_k=0 turns it off; set rollout.cache_top_k > 0 (e.g. 64), or use "
                              "rollout.engine=hf")

    def _check_teacher_location(self) -> None:
        check_choice("rollout.teacher_location", self.teacher_location, TEACHER_LOCATIONS)
        if self.vllm_url and self.engine == ROLLOUT_ENGINE_VLLM and not self.serves_teacher_logprobs():
            raise ConfigError(f"rollout.vllm_url={self.vllm_url!r} is the teacher's server, but this run asks it for "
                              f"nothing (rollout.source={self.source!r} with rollout.teacher_location=process: the "
                              "teacher scores in this process, the student is served by a server the run starts); "
                              "set rollout.teacher_location=server to use it, or drop rollout.vllm_url")
        if self.vllm_sync_every < 1:
            raise ConfigError(f"rollout.vllm_sync_every={self.vllm_sync_every!r}; valid: an integer >= 1 (optimizer "
                              "steps between pushes of the student's weights into its vLLM server)")
        if self.teacher_location != TEACHER_SERVED:
            return
        if self.engine != ROLLOUT_ENGINE_VLLM:
            raise ConfigError(f"rollout.teacher_location=server needs rollout.engine=vllm (got {self.engine!r}): the "
                              "teacher server is a vLLM server; or use rollout.teacher_location=process")
        if self.cache_top_k == 0 or self.teacher_logits != "sparse":
            raise ConfigError(f"rollout.teacher_location=server gives the teacher's top-k log-probs only, but "
                              f"rollout.cache_top_k={self.cache_top_k} and rollout.teacher_logits="
                              f"{self.teacher_logits!r}; valid: cache_top_k > 0 with teacher_logits=sparse, or "
                              "rollout.teacher_location=process for the teacher's full distributions")


@dataclass
class TrainSpec:
    """Optimisation and training-loop settings (the `train:` node of conf/config.yaml)."""

    max_steps: int
    batch_size: int
    accumulate: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float | None
    num_train: int
    max_new_tokens: int | None
    log_every: int
    checkpoint_every: int
    keep_checkpoints: bool  # false: a finished run deletes its checkpoints/ (its draft/ and results stay)
    eval_every: int
    eval_num: int
    lora_rank: int
    freeze_embeddings: bool  # keep the (tied) embedding / output head fixed: train the layers and norms
    release_target: bool  # teacher data only: drop the target once it is made (distillspec.teacherless)
    curve: str  # what the periodic evaluations measure: SD, or the held-out acceptance (distillspec.heldout)

    def __post_init__(self) -> None:
        check_field_types(self, "train")
        for name in ("max_steps", "batch_size", "accumulate", "num_train", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} is invalid; valid: >= 1")
        for name in ("warmup_steps", "eval_every", "eval_num", "lora_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} is invalid; valid: >= 0")
        check_range("train.lr", self.lr, lo=0.0, lo_open=True)
        check_range("train.weight_decay", self.weight_decay, lo=0.0)
        if self.grad_clip is not None:
            check_range("train.grad_clip", self.grad_clip, lo=0.0)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"train.max_new_tokens={self.max_new_tokens!r} is invalid; valid: >= 1 or null")
        check_choice("train.curve", self.curve, CURVES)
