"""Metric names shared by code, configs, loggers and reports. Never spell these as bare strings elsewhere."""

# --- speculative decoding evaluation (per run; per-example values use the same names) ---
ALPHA_TOK = "sd/alpha_tok"              # accepted draft tokens / drafted tokens
ALPHA_SEQ = "sd/alpha_seq"              # accepted draft tokens / output tokens (DistillSpec's definition)
ALPHA_EXPECTED = "sd/alpha_expected"    # mean over drafted positions of sum_v min(p, q) = 1 - TV(p, q)
BLOCK_EFFICIENCY = "sd/tau"             # tokens emitted per target forward
MEAN_ACCEPTED_LEN = "sd/mean_accepted_len"  # accepted draft tokens per block
# vLLM's convention: 1 + accepted draft tokens / drafts (each verification emits one target token on top);
# it equals tau except where EOS or the token cap cut the last block (tau counts emitted tokens only).
MEAN_ACCEPTANCE_LENGTH = "sd/mean_acceptance_length"
ACCEPT_POS_PREFIX = "sd/accept_pos/"    # + k (1..gamma): fraction of blocks whose k-th drafted token was accepted
ALPHA_GREEDY_DRAFT = "sd/alpha_greedy_draft"  # mean p(argmax q): what a draft proposing its argmax with q
#                                         treated as one-hot would be accepted (vLLM's default draft_model scheme)
TAU_PREDICTED = "sd/tau_predicted"      # (1 - a^(g+1)) / (1 - a), a = ALPHA_EXPECTED (per-position acceptance)
COST_RATIO = "sd/cost_ratio"            # c = draft forward time / target forward time (measured)
SPEEDUP = "sd/speedup"                  # wall-clock: target-only time / SD time, same prompts, same batch size
SPEEDUP_PREDICTED = "sd/speedup_predicted"  # tau / (c * gamma + 1)
SPEEDUP_MIN = "sd/speedup_min"          # spread of SPEEDUP over the timed rounds (SPEEDUP is their median round)
SPEEDUP_MAX = "sd/speedup_max"
VERIFY_COST_RATIO = "sd/verify_cost_ratio"  # v = time per verification call / time per target-only decode step
SPEEDUP_PREDICTED_V = "sd/speedup_predicted_v"  # tau / (c_step * gamma + v), c_step = c * v (see sd/metrics.py)
SPEED_ROUNDS = "sd/speed_rounds"        # timed rounds per batch (SD and target-only alternate which goes first)
GAMMA = "sd/gamma"                      # drafted tokens per block actually used (the choice of sd.gamma=auto)
# Phase split of the SD wall time (seconds, median round, summed over batches): the four sum to SD_TIME.
SD_TIME = "sd/time_total"
SD_TIME_PREFILL = "sd/time_prefill"     # prompt prefill forwards of both models
SD_TIME_DRAFT = "sd/time_draft"         # draft forwards after prefill
SD_TIME_TARGET = "sd/time_target"       # target verification forwards
SD_TIME_OTHER = "sd/time_other"         # everything else (sampling, verification, cache bookkeeping)
TARGET_TIME = "sd/target_time_total"    # target-only baseline wall time = TARGET_TIME_PREFILL + TARGET_TIME_DECODE
TARGET_TIME_PREFILL = "sd/target_time_prefill"
TARGET_TIME_DECODE = "sd/target_time_decode"
TRUNCATED_FRACTION = "sd/truncated_fraction"  # SD outputs cut at max_new_tokens (no EOS)
ANSWER_CUT_FRACTION = "sd/answer_cut_fraction"  # ... and cut before the task's final answer (tasks that have one)
QUALITY_CUT_LIMIT = 0.5  # above this ANSWER_CUT_FRACTION, task quality measures the token cap: not a result
SD_TOKENS_PER_S = "sd/tokens_per_s"
TARGET_TOKENS_PER_S = "sd/target_tokens_per_s"
BOOKKEEPING_FRACTION = "sd/bookkeeping_fraction"  # SD_TIME_OTHER / SD_TIME (prefill counts as model time)
NUM_EXAMPLES = "sd/num_examples"
NUM_DRAFTED = "sd/num_drafted"
NUM_OUTPUT_TOKENS = "sd/num_output_tokens"
ENTROPY_BINS = "sd/entropy_bins"        # table: bin edges, counts, acceptance per bin
QUALITY_PREFIX = "quality/"             # + the task's metric name, e.g. quality/accuracy, quality/rouge1
DRAFT_QUALITY_PREFIX = "draft_quality/" # the same metric on the draft's own (draft-only) generations

# --- held-out acceptance (distillspec.heldout): teacher-forced along stored target samples, no SD ---
ALPHA_HELDOUT = "heldout/alpha_expected"        # mean over positions of sum_v min(p, q), SD's processed p and q
ALPHA_HELDOUT_LO = "heldout/alpha_expected_lo"  # its 95 % bootstrap CI over prompts
ALPHA_HELDOUT_HI = "heldout/alpha_expected_hi"
HELDOUT_TRUNCATED = "heldout/truncated_fraction"  # positions whose target nucleus exceeds the stored top-k
HELDOUT_TAIL_GAP = "heldout/tail_gap"           # top_p = 1: mean bound on the mass left out (alpha is a lower bound)
HELDOUT_POSITIONS = "heldout/num_positions"
CURVES = ("sd", "heldout")  # train.curve: what the periodic evaluations measure

# Display names for figures and tables (distillspec.report_plots.label adds the val/ and quality prefixes).
LABELS = {
    ALPHA_EXPECTED: "α_expected (1 − TV)", ALPHA_TOK: "α_tok", ALPHA_SEQ: "α_seq",
    BLOCK_EFFICIENCY: "τ (block efficiency)", SPEEDUP: "speedup, measured",
    SPEEDUP_PREDICTED: "speedup, predicted τ/(cγ+1)", SPEEDUP_PREDICTED_V: "speedup, predicted τ/(c·vγ+v)",
    VERIFY_COST_RATIO: "verify-cost ratio v", COST_RATIO: "draft/target cost ratio c", GAMMA: "γ",
    MEAN_ACCEPTANCE_LENGTH: "mean acceptance length (vLLM: 1 + accepted/drafts)",
    ALPHA_GREEDY_DRAFT: "E[p(argmax q)] (argmax drafts, one-hot q)",
    ALPHA_HELDOUT: "α_expected, held-out (teacher-forced)",
}


def label(key: str) -> str:
    """Display name of a metric (per-position acceptance rows get theirs from the position)."""
    if key.startswith(ACCEPT_POS_PREFIX):
        return f"accepted at drafted position {key[len(ACCEPT_POS_PREFIX):]} (per block)"
    return LABELS.get(key, key)


def accept_pos_key(k: int) -> str:
    """Metric name of the per-position acceptance rate at drafted position k (1-based)."""
    return f"{ACCEPT_POS_PREFIX}{k}"

# --- distillation training ---
TRAIN_LOSS = "train/loss"
TRAIN_DIVERGENCE = "train/divergence"   # unweighted divergence (before gating weights)
TRAIN_TAR = "train/tar"                 # SpecKD gate: token acceptance rate
TRAIN_TEACHER_ENTROPY = "train/teacher_entropy"
TRAIN_ALIGNMENT = "train/alignment"     # mean 1 - TV(p, q) on the rollouts: cheap alpha estimate
TRAIN_COMPLETION_TOKENS = "train/completion_tokens"
TRAIN_LR = "train/lr"
TRAIN_STEP_SECONDS = "train/step_seconds"        # wall time of the step: sync, rollouts, teacher, loss, optimizer
TRAIN_ROLLOUT_SECONDS = "train/rollout_seconds"  # ...of which making the step's sequences (sync included)
TRAIN_SYNC_SECONDS = "train/sync_seconds"        # ...of which pushing the student's weights to vLLM (0: none)
TRAIN_BETA_MEAN = "train/beta_mean"     # div=adaptive: mean per-token beta over completion tokens
TRAIN_BLOCK_WEIGHT_MEAN = "train/block_weight_mean"  # div.block_weighting: mean reach probability
TRAIN_DIV_BY_ENTROPY = "train/div_by_entropy/"        # + "<lo>-<hi>" nats: mean divergence per teacher-entropy bin
TRAIN_TOKENS_BY_ENTROPY = "train/tokens_by_entropy/"  # + "<lo>-<hi>": share of tokens in that bin
VAL_PREFIX = "val/"                     # periodic SD evaluation during training: val/ + the sd/ names

# --- SD KV cache (sd.kv) ---
KV_MODES = ("dynamic", "static")        # dynamic: transformers' DynamicCache; static: preallocated (static_cache.py)

# --- run bookkeeping ---
METRICS_FILE = "metrics.json"
TRAINED_BY = "trained_by"  # metrics.json of stage=eval draft_checkpoint=<run>/draft: {"method", "draft"} of <run>
PEAK_RSS_GIB = "peak_rss_gib"  # metrics.json: the run's peak resident memory (this process; distillspec.memory)
PHASE_PEAK_RSS_GIB = "phase_peak_rss_gib"  # metrics.json: {phase: its peak resident memory}, as phase_seconds
RUN_CONFIG_FILE = "run_config.json"     # the resolved config a run dir was started with (rerun check)
CONFIG_CHANGES_FILE = "config_changes.jsonl"  # one line per `resume=force` rerun with a changed config
RESUME_FORCE = "force"                  # resume=force: continue a run dir although its config changed
STAGE_TRAIN = "train"
STAGE_EVAL = "eval"
STAGE_TRAIN_EVAL = "train_eval"
STAGE_PLAN = "plan"                     # memory plan only: nothing is loaded (also `dry_run=true`)
STAGES = (STAGE_TRAIN_EVAL, STAGE_TRAIN, STAGE_EVAL, STAGE_PLAN)
PLAN_FILE = "plan.json"
ERROR_FILE = "error.json"               # a failed sweep job: {job, error_type, message, exit_code} in its run dir
ERROR_TRACEBACK_FILE = "error.txt"      # ... and its traceback
FAILURES_FILE = "failures.jsonl"        # the sweep dir: one line per failed job of the latest launch
EXIT_CONFIG_ERROR = 2                   # run.py exit codes: a refused setting (ConfigError)
EXIT_NON_FINITE = 3                     # training or SD hit NaN/inf (NonFiniteError)
EXIT_OTHER_ERROR = 1                    # any other failure (a sweep whose failed jobs differ in kind)
EXIT_ENGINE_ERROR = 4                   # a generation engine in another process (vLLM server) died or failed

# --- task quality metrics (logged as QUALITY_PREFIX + name; all are fractions in [0, 1]) ---
ACCURACY = "accuracy"                   # extracted final number == reference number
ROUGE1 = "rouge1"                       # ROUGE F-measure (rouge-score, stemming on)
ROUGE2 = "rouge2"
ROUGEL = "rougeL"
QUALITY_LABELS = {ACCURACY: "accuracy", ROUGE1: "ROUGE-1", ROUGE2: "ROUGE-2", ROUGEL: "ROUGE-L"}

# --- setting values checked before any heavy import (specs.py validates with these; the engine uses them) ---
LENIENCES: tuple[str, ...] = ("none", "p_over_eps", "p_over_eps2", "p_pow_eps")  # sd.lenience: f(p, eps)
FIRST_TOKEN_MODES: tuple[str, ...] = ("draft", "prefill")  # sd.first_token
ENTROPY_BIN_LO = 1e-4  # nats; entropies below fall in [0, lo)
ENTROPY_BIN_HI = 10.0  # nats; a 49k-152k vocabulary reaches ~11, so the top bin [hi, inf) stays small
DIVERGENCES: tuple[str, ...] = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "adaptive")  # div.divergence
BLOCK_WEIGHTINGS: tuple[str, ...] = ("none", "block", "block_avg")  # div.block_weighting
ROLLOUT_ENGINE_HF = "hf"      # rollout.engine: our decoding loop, in the training process
ROLLOUT_ENGINE_VLLM = "vllm"  # rollout.engine: a vLLM server over HTTP (distillspec.serving.server)
ROLLOUT_ENGINES: tuple[str, ...] = (ROLLOUT_ENGINE_HF, ROLLOUT_ENGINE_VLLM)
TEACHER_IN_PROCESS = "process"  # rollout.teacher_location: the teacher is loaded here and scores on-policy data
TEACHER_SERVED = "server"       # ...: the vLLM teacher server scores it (top-k prompt log-probs); never loaded here
TEACHER_LOCATIONS: tuple[str, ...] = (TEACHER_IN_PROCESS, TEACHER_SERVED)
