"""GPU memory planning before anything is loaded: `python run.py stage=plan ...` (or `dry_run=true`).

From the two models' configs (no weights: `distillspec.models.shapes.count_parameters` builds them on the
meta device) and the configured batch and lengths, estimate the peak GPU memory of one training process
and of the SD evaluation, per component, and which cards it fits. Then the same estimate for the usual
levers (bf16 or 8-bit teacher, LoRA, gradient checkpointing, FSDP), so a user picks one before launching.

The model is deliberately simple and stated here so it can be checked (bytes; B = train.batch_size,
L = task.max_prompt_tokens, T = train.max_new_tokens, V = vocabulary, h = hidden, I = MLP width,
q/kv = attention widths, n_layers = decoder layers, N = parameters):
  weights        N * bytes(dtype); an 8-bit teacher keeps 1 byte per linear weight, 4-bit 0.53, and its
                 embedding (and untied head) in the compute dtype
  gradients      trainable * bytes(student dtype) (full fine-tuning: all of N; LoRA: r * (in + out) per
                 adapted matrix); AdamW state 2 * trainable * bytes(student dtype); FSDP divides these
                 three student terms by the number of GPUs
  activations    B * (L + T) * n_layers * (4h + 3q + 4kv + 4I) * act_bytes saved for backward; with
                 gradient checkpointing B * (L + T) * (n_layers * h + one layer's full set) * act_bytes
  logits         B * T * V * (teacher logits + student logits + their gradient) in the compute dtype,
                 plus the loss's float32 temporaries: ~8 * rows * V * 4 with rows = B * T unchunked or
                 div.chunk_size chunked (bench_loss_memory.py measured ~7.6 float32 copies unchunked)
  rollout        KV caches of the generating model(s): 2 * n_layers * kv * B * (L + T) * bytes
  SD evaluation  both KV caches at sd.batch_size * (L + sd tokens + gamma + 1), verify logits in float32
  overhead       1 GiB (CUDA context, kernels) + 10 % allocator slack
Peak = weights + gradients + optimizer + max(training transient, rollout, SD evaluation) + overhead.
It is an estimate for choosing a set-up, accurate to roughly +-20 %; measure with benchmarks/gpu_check.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from distillspec.errors import ConfigError, check_choice

GIB = 1024 ** 3
CARDS_GB = (24, 40, 80)
USABLE = 0.95  # share of a card's nominal memory a process can allocate
OVERHEAD_BYTES = 1 * GIB
SLACK = 0.10
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "float64": 8.0}
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.53}
LOSS_COPIES = 8  # float32 (rows, V) temporaries of the loss
LORA_OPTION_RANK = 16
FSDP_OPTION_GPUS = 8


VERIFIER_ROW = "verifier weights (full-precision target)"


@dataclass(frozen=True)
class PlanSettings:
    """Everything the estimate depends on besides the two models' shapes."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    student_dtype: str = "bfloat16"
    teacher_dtype: str = "bfloat16"
    teacher_quantization: str | None = None
    full_precision_verifier: bool = False  # pair.verify_full_precision with a quantized teacher: a second target
    act_bytes: float = 2.0
    lora_rank: int = 0
    gradient_checkpointing: bool = False
    chunk_size: int | None = 1024
    shards: int = 1
    rollout_models: tuple[str, ...] = ("student",)
    sd_batch: int = 8
    sd_new_tokens: int = 128
    gamma: int = 5

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_tokens", "new_tokens", "shards", "sd_batch", "sd_new_tokens", "gamma"):
            if getattr(self, name) < 1:
                raise ConfigError(f"plan: {name}={getattr(self, name)!r} is invalid; valid: >= 1")
        check_choice("plan student dtype", self.student_dtype, DTYPE_BYTES)
        check_choice("plan teacher dtype", self.teacher_dtype, DTYPE_BYTES)
        check_choice("plan teacher quantization", self.teacher_quantization, [None, *QUANT_BYTES])


def weight_bytes(pc, dtype: str, quantization: str | None = None) -> float:
    """Bytes of a model's weights; quantized models keep embeddings (and an untied head) unquantized."""
    if quantization is None:
        return pc.total * DTYPE_BYTES[dtype]
    kept = pc.embedding + pc.head
    return kept * DTYPE_BYTES[dtype] + (pc.total - kept) * QUANT_BYTES[quantization]


def trainable_params(pc, lora_rank: int) -> int:
    """All parameters, or the LoRA adapters' r * (in + out) per adapted matrix per layer."""
    if lora_rank <= 0:
        return pc.total
    return lora_rank * pc.num_layers * sum(i + o for i, o in pc.matrices_per_layer)


def _layer_acts(pc) -> int:
    """Elements per token saved for backward by one decoder layer (see the module docstring)."""
    q = pc.matrices_per_layer[0][1] if pc.matrices_per_layer else pc.hidden
    return 4 * pc.hidden + 3 * q + 4 * pc.kv_dim + 4 * pc.intermediate


def kv_bytes(pc, rows: int, length: int, dtype_bytes: float) -> float:
    return 2.0 * pc.num_layers * pc.kv_dim * rows * length * dtype_bytes


def estimate(student, teacher, s: PlanSettings) -> dict[str, float]:
    """Bytes per component and the peak, for one process. student/teacher: `ParamCount`s."""
    sb = DTYPE_BYTES[s.student_dtype]
    tb = DTYPE_BYTES[s.teacher_dtype]  # the quantized teacher computes in this dtype too
    train = trainable_params(student, s.lora_rank)
    seq = s.prompt_tokens + s.new_tokens
    tokens = s.batch * seq
    if s.gradient_checkpointing:
        acts = tokens * (student.num_layers * student.hidden + _layer_acts(student)) * s.act_bytes
    else:
        acts = tokens * student.num_layers * _layer_acts(student) * s.act_bytes
    rows = s.batch * s.new_tokens
    loss_rows = rows if s.chunk_size is None else min(rows, s.chunk_size)
    logits = rows * student.vocab * (tb + 2 * sb) + LOSS_COPIES * loss_rows * student.vocab * 4.0
    kv = {"student": (student, sb), "teacher": (teacher, tb)}
    rollout = sum(kv_bytes(kv[m][0], s.batch, seq, kv[m][1]) for m in s.rollout_models)
    sd_len = s.prompt_tokens + s.sd_new_tokens + s.gamma + 1
    sd_eval = (kv_bytes(student, s.sd_batch, sd_len, sb) + kv_bytes(teacher, s.sd_batch, sd_len, tb)
               + s.sd_batch * (s.gamma + 1) * teacher.vocab * 4.0 * 3)
    out = {
        "teacher weights": weight_bytes(teacher, s.teacher_dtype, s.teacher_quantization),
        "student weights": student.total * sb / (1 if s.lora_rank else s.shards),
        "gradients": train * sb / s.shards,
        "optimizer (AdamW)": 2.0 * train * sb / s.shards,
        "activations": acts,
        "logits + loss": logits,
        "rollout KV caches": rollout,
        "SD eval (KV + logits)": sd_eval,
    }
    if s.full_precision_verifier and s.teacher_quantization:
        out = {"teacher weights": out.pop("teacher weights"), VERIFIER_ROW: weight_bytes(teacher, s.teacher_dtype),
               **out}
    persistent = sum(out.get(k, 0.0) for k in ("teacher weights", VERIFIER_ROW, "student weights", "gradients",
                                               "optimizer (AdamW)"))
    transient = max(acts + logits, rollout, sd_eval)
    out["overhead"] = OVERHEAD_BYTES + SLACK * (persistent + transient)
    out["peak"] = persistent + transient + out["overhead"]
    return out


def fits(peak_bytes: float, cards_gb=CARDS_GB) -> dict[int, bool]:
    return {gb: peak_bytes <= USABLE * gb * GIB for gb in cards_gb}


def options(student, teacher, s: PlanSettings) -> list[tuple[str, float]]:
    """(label, peak bytes) for the configuration and the usual memory levers applied to it."""
    rows = [("as configured", estimate(student, teacher, s)["peak"])]
    if s.teacher_dtype == "float32" and s.teacher_quantization is None:
        rows.append(("teacher in bf16 (pair.target_dtype=bfloat16)",
                     estimate(student, teacher, replace(s, teacher_dtype="bfloat16"))["peak"]))
    if s.teacher_quantization is None:
        rows.append(("teacher 8-bit (pair.target_quantization=8bit)",
                     estimate(student, teacher, replace(s, teacher_quantization="8bit"))["peak"]))
    if s.lora_rank == 0:
        rows.append((f"LoRA r={LORA_OPTION_RANK} (train.lora_rank={LORA_OPTION_RANK})",
                     estimate(student, teacher, replace(s, lora_rank=LORA_OPTION_RANK))["peak"]))
    if not s.gradient_checkpointing:
        rows.append(("gradient checkpointing (pair.gradient_checkpointing=true)",
                     estimate(student, teacher, replace(s, gradient_checkpointing=True))["peak"]))
    if s.shards == 1 and s.lora_rank == 0:
        rows.append((f"FSDP on {FSDP_OPTION_GPUS} GPUs (trainer=fsdp), per GPU",
                     estimate(student, teacher, replace(s, shards=FSDP_OPTION_GPUS))["peak"]))
    return rows


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def format_plan(names: tuple[str, str], student, teacher, s: PlanSettings, extra_cards: tuple[int, ...] = ()) -> str:
    """Markdown: parameter counts, the per-component estimate, the cards it fits, and the levers."""
    cards = tuple(sorted(set(CARDS_GB) | set(extra_cards)))
    est = estimate(student, teacher, s)
    gib = lambda b: f"{b / GIB:,.2f}"  # noqa: E731
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    head = (f"draft/student {names[0]}: {student.total:,} parameters "
            f"({trainable_params(student, s.lora_rank):,} trainable); target/teacher {names[1]}: "
            f"{teacher.total:,} parameters\n"
            f"train batch {s.batch} x ({s.prompt_tokens} prompt + {s.new_tokens} new) tokens, student "
            f"{s.student_dtype}, teacher {s.teacher_quantization or s.teacher_dtype}, LoRA r={s.lora_rank}, "
            f"gradient checkpointing {s.gradient_checkpointing}, loss chunk {s.chunk_size}, shards {s.shards}; "
            f"SD eval batch {s.sd_batch}, gamma {s.gamma}, {s.sd_new_tokens} new tokens")
    comp = _table(["component", "GiB"], [[k, gib(v)] for k, v in est.items()])
    opt_rows = [[label, gib(peak)] + [yes(ok) for ok in fits(peak, cards).values()]
                for label, peak in options(student, teacher, s)]
    opts = _table(["set-up", "peak GiB"] + [f"fits {gb} GB" for gb in cards], opt_rows)
    return (f"{head}\n\n{comp}\n\n{opts}\n\nEstimate only (distillspec/planning.py states the model); "
            f"a card fits when the peak is <= {USABLE:.0%} of its memory.")


def settings_from_specs(pair, task, train, sd, objective, rollout, precision: str, strategy: str,
                        shards: int) -> PlanSettings:
    """PlanSettings from the run's specs (the planner assumes a CUDA card: dtype "auto" = bfloat16)."""
    dtype = "bfloat16" if pair.dtype == "auto" else pair.dtype
    tdtype = pair.target_dtype or pair.dtype
    tdtype = "bfloat16" if tdtype == "auto" else tdtype
    sources = {"student": ("student",), "teacher": ("teacher",), "fixed": (), "skd": ("student", "teacher")}
    if rollout.source == "mixed":
        used = [k for k, v in (rollout.mix or {}).items() if v > 0]
        models = tuple(sorted({m for k in used for m in sources[k]}))
    else:
        models = sources[rollout.source]
    half = "16" in str(precision) or dtype != "float32"  # bf16-mixed / 16-mixed autocast, or 16-bit weights
    return PlanSettings(
        batch=train.batch_size, prompt_tokens=task.max_prompt_tokens,
        new_tokens=train.max_new_tokens or task.max_new_tokens, student_dtype=dtype, teacher_dtype=tdtype,
        teacher_quantization=pair.target_quantization,
        full_precision_verifier=bool(getattr(pair, "verify_full_precision", False)), act_bytes=2.0 if half else 4.0,
        lora_rank=train.lora_rank, gradient_checkpointing=pair.gradient_checkpointing,
        chunk_size=objective.chunk_size, shards=shards if strategy == "fsdp" else 1, rollout_models=models,
        sd_batch=sd.batch_size, sd_new_tokens=sd.max_new_tokens or task.max_new_tokens, gamma=sd.gamma)


def plan_run(pair, task, train, sd, objective, rollout, trainer, run_dir, cards: tuple[int, ...] = ()) -> dict:
    """The `stage=plan` body: count parameters from configs (no weights), print and save the plan.

    trainer: the `trainer` config node (precision, strategy, devices, num_nodes are read). Writes
    run_dir/plan.json; returns it.
    """
    from distillspec import constants as C
    from distillspec.jsonio import write_json_atomic
    from distillspec.models.shapes import config_for, count_parameters

    check_choice("pair.target_quantization", pair.target_quantization, [None, *QUANT_BYTES])
    pair.check_settings()  # names, dtypes, combinations: the device-free checks (quantization needs no GPU to plan)
    devices = trainer.get("devices", 1)
    shards = (devices if isinstance(devices, int) and devices > 0 else 1) * int(trainer.get("num_nodes", 1) or 1)
    s = settings_from_specs(pair, task, train, sd, objective, rollout, trainer.get("precision", "32-true"),
                            str(trainer.get("strategy", "auto")), shards)
    student, teacher = count_parameters(config_for(pair.draft)), count_parameters(config_for(pair.target))
    text = format_plan((pair.draft, pair.target), student, teacher, s, tuple(int(c) for c in cards))
    print(text, flush=True)
    est = estimate(student, teacher, s)
    out = {"stage": C.STAGE_PLAN, "draft": pair.draft, "target": pair.target,
           "params": {"student": student.total, "teacher": teacher.total,
                      "student_trainable": trainable_params(student, s.lora_rank)},
           "settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
           "estimate_gib": {k: v / GIB for k, v in est.items()},
           "fits": {str(gb): ok for gb, ok in fits(est["peak"], tuple(sorted(set(CARDS_GB) | set(cards)))).items()},
           "options_gib": {label: peak / GIB for label, peak in options(student, teacher, s)}}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / C.PLAN_FILE, out)
    logging.getLogger("distillspec").info("wrote the memory plan to %s", run_dir / C.PLAN_FILE)
    return out
