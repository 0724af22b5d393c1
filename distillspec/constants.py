"""Metric names shared by code, configs, loggers and reports. Never spell these as bare strings elsewhere."""

# --- speculative decoding evaluation (per run; per-example values use the same names) ---
ALPHA_TOK = "sd/alpha_tok"              # accepted draft tokens / drafted tokens
ALPHA_SEQ = "sd/alpha_seq"              # accepted draft tokens / output tokens (DistillSpec's definition)
ALPHA_EXPECTED = "sd/alpha_expected"    # mean over drafted positions of sum_v min(p, q) = 1 - TV(p, q)
BLOCK_EFFICIENCY = "sd/tau"             # tokens emitted per target forward
MEAN_ACCEPTED_LEN = "sd/mean_accepted_len"  # accepted draft tokens per block
TAU_PREDICTED = "sd/tau_predicted"      # (1 - a^(g+1)) / (1 - a), a = ALPHA_EXPECTED (per-position acceptance)
COST_RATIO = "sd/cost_ratio"            # c = draft forward time / target forward time (measured)
SPEEDUP = "sd/speedup"                  # wall-clock: target-only time / SD time, same prompts, same batch size
SPEEDUP_PREDICTED = "sd/speedup_predicted"  # tau / (c * gamma + 1)
SD_TOKENS_PER_S = "sd/tokens_per_s"
TARGET_TOKENS_PER_S = "sd/target_tokens_per_s"
BOOKKEEPING_FRACTION = "sd/bookkeeping_fraction"  # share of SD time outside model forwards
NUM_EXAMPLES = "sd/num_examples"
NUM_DRAFTED = "sd/num_drafted"
NUM_OUTPUT_TOKENS = "sd/num_output_tokens"
ENTROPY_BINS = "sd/entropy_bins"        # table: bin edges, counts, acceptance per bin
QUALITY_PREFIX = "quality/"             # + the task's metric name, e.g. quality/accuracy, quality/rouge1
DRAFT_QUALITY_PREFIX = "draft_quality/" # the same metric on the draft's own (draft-only) generations

# --- distillation training ---
TRAIN_LOSS = "train/loss"
TRAIN_DIVERGENCE = "train/divergence"   # unweighted divergence (before gating weights)
TRAIN_TAR = "train/tar"                 # SpecKD gate: token acceptance rate
TRAIN_TEACHER_ENTROPY = "train/teacher_entropy"
TRAIN_ALIGNMENT = "train/alignment"     # mean 1 - TV(p, q) on the rollouts: cheap alpha estimate
TRAIN_COMPLETION_TOKENS = "train/completion_tokens"
TRAIN_LR = "train/lr"
TRAIN_BETA_MEAN = "train/beta_mean"     # div=adaptive: mean per-token beta over completion tokens
TRAIN_BLOCK_WEIGHT_MEAN = "train/block_weight_mean"  # div.block_weighting: mean reach probability
TRAIN_DIV_BY_ENTROPY = "train/div_by_entropy/"        # + "<lo>-<hi>" nats: mean divergence per teacher-entropy bin
TRAIN_TOKENS_BY_ENTROPY = "train/tokens_by_entropy/"  # + "<lo>-<hi>": share of tokens in that bin
VAL_PREFIX = "val/"                     # periodic SD evaluation during training: val/ + the sd/ names

# --- run bookkeeping ---
METRICS_FILE = "metrics.json"
STAGE_TRAIN = "train"
STAGE_EVAL = "eval"
STAGE_TRAIN_EVAL = "train_eval"
STAGES = (STAGE_TRAIN_EVAL, STAGE_TRAIN, STAGE_EVAL)

# --- task quality metrics (logged as QUALITY_PREFIX + name; all are fractions in [0, 1]) ---
ACCURACY = "accuracy"                   # extracted final number == reference number
ROUGE1 = "rouge1"                       # ROUGE F-measure (rouge-score, stemming on)
ROUGE2 = "rouge2"
ROUGEL = "rougeL"
