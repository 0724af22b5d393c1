"""Tasks: a prompt source, prompt formatting, a prompt-length filter, a generation budget and a quality metric.

Hydra builds tasks with `_target_` and plain keyword arguments; nothing here reads a config object.

    task = GSM8KTask(source="local", path="/abs/test.jsonl", train_path="/abs/train.jsonl")
    items = task.encode(task.load("eval"), tokenizer, limit=64, seed=0)   # list[PromptBatchItem]
    task.score(predictions, [it.reference for it in items])               # {"accuracy": 0.42}

Sources (`DatasetTask`): `source="hf"` loads `hf_id`/`hf_config` with `datasets.load_dataset` (needs a
network or a warm HF cache); `source="local"` reads `path` (eval) / `train_path` (train) as given: the
caller makes relative paths absolute. Local files are a JSON array of objects or JSON Lines; a line that
is not JSON but a Python dict literal is also accepted (the official DialogSum release is written that way).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from distillspec.errors import ConfigError, check_choice, check_range

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
CHAT_MODES = ("auto", "on", "off")
SOURCES = ("hf", "local")
_ENCODE_CHUNK = 256  # prompts formatted and tokenised per batch call


@dataclass
class Example:
    """One raw task example. prompt: the user message / raw input text. reference: what `score` compares
    against (None when quality is undefined). target_text: a ground-truth completion (for training on
    fixed dataset outputs), or None. meta: free-form extras (always holds "split")."""

    uid: str
    prompt: str
    reference: str | None = None
    target_text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptBatchItem:
    """One encoded prompt. input_ids: the formatted prompt's token ids (length <= max_prompt_tokens).
    prompt_text: the formatted prompt. target_ids: the tokenised target_text (no special tokens) or None."""

    uid: str
    input_ids: list[int]
    prompt_text: str
    reference: str | None
    target_ids: list[int] | None


class Task:
    """Base task. Subclasses set the class attributes and implement `_load(split)`.

    Args:
        max_new_tokens: generation budget per prompt (None = the task's default).
        max_prompt_tokens: prompts with more tokens (after formatting) are dropped by `encode`.
        system_prompt: optional system message (chat) or preamble (plain); None = none.
        instruction: template of the user message; must contain `{input}` (the example's prompt).
        chat_template: "auto" (use the tokenizer's chat template when it has one), "on" (require it) or
            "off" (always the plain format: [system_prompt + blank line] + user message + answer_prefix).
        chat_template_kwargs: extra keyword arguments of every `apply_chat_template` call (training prompts,
            evaluation, the vLLM check: all encode through `format_prompt`), e.g. {"enable_thinking": False}
            for Qwen3, whose template otherwise lets the model think first. None (default): none.
    """

    name = "task"
    quality_metrics: tuple[str, ...] = ()
    instruction = "{input}"
    answer_prefix = "\n"  # ends plain-format prompts (no chat template), e.g. "\nAnswer:"
    default_max_new_tokens = 128
    default_max_prompt_tokens = 512

    def __init__(self, *, max_new_tokens: int | None = None, max_prompt_tokens: int | None = None,
                 system_prompt: str | None = None, instruction: str | None = None,
                 chat_template: str = "auto", chat_template_kwargs: Mapping[str, Any] | None = None) -> None:
        self.max_new_tokens = int(self.default_max_new_tokens if max_new_tokens is None else max_new_tokens)
        self.max_prompt_tokens = int(
            self.default_max_prompt_tokens if max_prompt_tokens is None else max_prompt_tokens)
        check_range("task.max_new_tokens", self.max_new_tokens, lo=1)
        check_range("task.max_prompt_tokens", self.max_prompt_tokens, lo=1)
        check_choice("task.chat_template", chat_template, CHAT_MODES)
        self.chat_template = chat_template
        self.chat_template_kwargs = _template_kwargs(chat_template_kwargs)
        self.system_prompt = system_prompt
        if instruction is not None:
            self.instruction = instruction
        if "{input}" not in self.instruction:
            raise ConfigError(f"task.instruction must contain '{{input}}'; got {self.instruction!r}")

    # --- data -------------------------------------------------------------------------------------
    def _load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def load(self, split: str) -> list[Example]:
        """All examples of `split` ("train" or "eval"); raises ConfigError when there are none."""
        check_choice("split", split, SPLITS)
        examples = self._load(split)
        if not examples:
            raise ConfigError(f"task {self.name!r}: split {split!r} has no examples")
        for ex in examples:
            ex.meta.setdefault("split", split)
        return examples

    # --- formatting -------------------------------------------------------------------------------
    def uses_chat(self, tokenizer) -> bool:
        """Whether prompts for `tokenizer` go through its chat template (see `chat_template`)."""
        has = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template == "on" and not has:
            raise ConfigError(f"task.chat_template='on' but tokenizer {type(tokenizer).__name__} has no "
                              f"chat template; valid choices: {', '.join(CHAT_MODES)}")
        return has and self.chat_template != "off"

    def user_message(self, example: Example) -> str:
        return self.instruction.format(input=example.prompt)

    def format_prompt(self, example: Example, tokenizer) -> str:
        """The prompt text the model sees: chat template with a generation prompt, or the plain format."""
        user = self.user_message(example)
        if self.uses_chat(tokenizer):
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": user})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 **self.chat_template_kwargs)
        preamble = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        return preamble + user + self.answer_prefix

    def encode(self, examples: Sequence[Example], tokenizer, limit: int | None = None, seed: int = 0,
               shuffle: bool = True) -> list[PromptBatchItem]:
        """Format and tokenise, drop prompts over max_prompt_tokens, keep the first `limit`.

        Order: a seeded permutation of `examples` (torch.Generator(seed)) when shuffle, else as given;
        the kept items are the first `limit` survivors of the length filter in that order. Chat-formatted
        text already holds the template's special tokens, so it is tokenised with add_special_tokens=False;
        plain text gets the tokenizer's usual special tokens (e.g. BOS). Raises ConfigError when nothing
        survives, naming the split, how many were loaded and the filter.
        """
        if limit is not None:
            check_range("limit", limit, lo=1)
        n = len(examples)
        split = examples[0].meta.get("split", "?") if n else "?"
        if n == 0:
            raise ConfigError(f"task {self.name!r}: no examples to encode")
        if shuffle:
            import torch  # here: importing a task (settings checks) must not cost torch's import

            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
        else:
            order = list(range(n))
        chat = self.uses_chat(tokenizer)
        if chat and "enable_thinking" in str(tokenizer.chat_template) and \
                "enable_thinking" not in self.chat_template_kwargs:
            log.warning("task %s: the tokenizer's chat template reads enable_thinking and "
                        "task.chat_template_kwargs does not set it, so the template's default applies (Qwen3: "
                        "the model thinks first); set task.chat_template_kwargs.enable_thinking", self.name)
        items: list[PromptBatchItem] = []
        dropped, shortest = 0, None
        want = n if limit is None else int(limit)
        for start in range(0, n, _ENCODE_CHUNK):
            chunk = [examples[i] for i in order[start:start + _ENCODE_CHUNK]]
            texts = [self.format_prompt(ex, tokenizer) for ex in chunk]
            ids = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
            targets = _tokenize_optional([ex.target_text for ex in chunk], tokenizer)
            for ex, text, tok, tgt in zip(chunk, texts, ids, targets):
                if len(tok) > self.max_prompt_tokens:
                    dropped += 1
                    shortest = len(tok) if shortest is None else min(shortest, len(tok))
                    continue
                items.append(PromptBatchItem(uid=ex.uid, input_ids=list(tok), prompt_text=text,
                                             reference=ex.reference, target_ids=tgt))
                if len(items) == want:
                    break
            if len(items) == want:
                break
        if not items:
            raise ConfigError(
                f"task {self.name!r}, split {split!r}: all {n} loaded examples were removed by the length "
                f"filter (prompt tokens > task.max_prompt_tokens={self.max_prompt_tokens}; the shortest "
                f"formatted prompt has {shortest} tokens); raise task.max_prompt_tokens")
        if dropped:
            log.info("task %s, split %s: dropped %d prompts longer than %d tokens", self.name, split, dropped,
                     self.max_prompt_tokens)
        if limit is not None and len(items) < limit:
            log.warning("task %s, split %s: asked for %d prompts, only %d of %d pass the length filter",
                        self.name, split, limit, len(items), n)
        return items

    # --- quality ----------------------------------------------------------------------------------
    def compute_quality(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Subclasses with quality_metrics return {metric name: mean value in [0, 1]}."""
        return {}

    def score(self, predictions: Sequence[str], references: Sequence[str | None]) -> dict[str, float]:
        """{name: value} for each name in quality_metrics ({} when the task defines no quality metric)."""
        if len(predictions) != len(references):
            raise ConfigError(f"task {self.name!r}: {len(predictions)} predictions but "
                              f"{len(references)} references")
        if not self.quality_metrics:
            return {}
        return self.compute_quality(predictions, references)


_RESERVED_TEMPLATE_ARGS = ("conversation", "messages", "tokenize", "add_generation_prompt", "chat_template")


def _template_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """task.chat_template_kwargs as a plain dict; ConfigError for a non-mapping or a key format_prompt sets
    itself (_RESERVED_TEMPLATE_ARGS)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ConfigError(f"task.chat_template_kwargs={kwargs!r} is invalid; valid: a mapping of template "
                          "variable names to values, e.g. {enable_thinking: false}")
    if bad := sorted(set(kwargs) & set(_RESERVED_TEMPLATE_ARGS)):
        raise ConfigError(f"task.chat_template_kwargs sets {', '.join(bad)}, which the task sets itself; valid: "
                          f"other template variables, e.g. enable_thinking (reserved: "
                          f"{', '.join(_RESERVED_TEMPLATE_ARGS)})")
    return dict(kwargs)


def _tokenize_optional(texts: Sequence[str | None], tokenizer) -> list[list[int] | None]:
    """Token ids (no special tokens) of each text, None where the text is None."""
    present = [i for i, t in enumerate(texts) if t is not None]
    out: list[list[int] | None] = [None] * len(texts)
    if present:
        ids = tokenizer([texts[i] for i in present], add_special_tokens=False)["input_ids"]
        for i, tok in zip(present, ids):
            out[i] = list(tok)
    return out


# --- local files and HF datasets -------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local file: a JSON array of objects, or one object per line (JSON, or a Python dict
    literal as in the official DialogSum files). Raises ConfigError naming the path on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file not found: {str(p)!r} (relative paths are resolved against the current "
                          f"directory {str(Path.cwd())!r})")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{str(p)!r} starts with '[' but is not a valid JSON array: {e}") from e
    else:
        rows = [_parse_line(line, p, k) for k, line in enumerate(text.splitlines(), 1) if line.strip()]
    bad = next((k for k, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ConfigError(f"{str(p)!r}: record {bad} is a {type(rows[bad - 1]).__name__}, expected an object")
    return rows


def _parse_line(line: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as json_err:
        try:
            return ast.literal_eval(line)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{str(path)!r} line {lineno} is neither JSON nor a Python dict literal: "
                              f"{json_err}") from json_err


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable(endpoint: str | None = None, timeout: float = 3.0) -> str | None:
    """Why the HF Hub cannot be reached (one TCP connect, `timeout` s), or None when it can."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port}: {exc}"
    return None


def load_hf_records(hf_id: str, hf_config: str | None, split: str,
                    offline_hint: str | None = None) -> list[dict[str, Any]]:
    """Rows of an HF dataset split via `datasets.load_dataset` (network or a warm cache needed).

    Fails at once (not after ~30-50 s of Hub retries) when the Hub is unreachable; with HF_HUB_OFFLINE=1
    only the HF cache is tried. offline_hint: what to use instead (e.g. "task=gsm8k_local").
    """
    import datasets

    hint = (f"use {offline_hint}" if offline_hint else "use task.source=local with task.path / task.train_path")
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")
    if not offline and (reason := hub_unreachable()):
        raise ConfigError(f"the Hugging Face Hub is unreachable ({reason}), so HF dataset {hf_id!r} cannot be "
                          f"loaded; {hint} (a copy already in the HF cache loads with HF_HUB_OFFLINE=1)")
    try:
        ds = datasets.load_dataset(hf_id, hf_config, split=split)
    except Exception as e:  # offline, unknown id/config/split: one clear message, original chained
        raise ConfigError(f"could not load HF dataset {hf_id!r} (config {hf_config!r}, split {split!r}): "
                          f"{type(e).__name__}: {e}. {'HF_HUB_OFFLINE=1 and not in the HF cache? ' if offline else ''}"
                          f"Offline? {hint}") from e
    return [dict(r) for r in ds]


class DatasetTask(Task):
    """A task whose examples come from an HF dataset or local JSON/JSONL files, one record per example.

    Args (besides Task's; None = the task's default):
        source: "hf" or "local". hf_id, hf_config: the HF dataset. train_split, eval_split: HF split names.
        path: local eval file. train_path: local train file (only needed to load "train").
        input_field: record field holding the prompt. output_field: field(s) holding the ground-truth
            output; a list means the first one present in a record (e.g. DialogSum's test file names its
            first reference `summary1`). id_field: field(s) used in the uid, same rule (None = row index).
    """

    hf_id: str | None = None
    offline_hint: str | None = None  # the task to use without a network, e.g. "task=gsm8k_local"
    hf_config: str | None = None
    train_split = "train"
    eval_split = "test"
    input_field = "input"
    output_field: str | Sequence[str] = "output"
    id_field: str | Sequence[str] | None = None

    def __init__(self, *, source: str = "hf", hf_id: str | None = None, hf_config: str | None = None,
                 path: str | None = None, train_path: str | None = None, train_split: str | None = None,
                 eval_split: str | None = None, input_field: str | None = None,
                 output_field: str | Sequence[str] | None = None,
                 id_field: str | Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_choice("task.source", source, SOURCES)
        self.source = source
        for key, value in (("hf_id", hf_id), ("hf_config", hf_config), ("train_split", train_split),
                           ("eval_split", eval_split), ("input_field", input_field),
                           ("output_field", output_field), ("id_field", id_field)):
            if value is not None:
                setattr(self, key, value)
        self.output_field = _as_tuple(self.output_field)
        self.id_field = None if self.id_field is None else _as_tuple(self.id_field)
        self.path, self.train_path = path, train_path
        if source == "hf" and not self.hf_id:
            raise ConfigError(f"task {self.name!r}: source=hf needs task.hf_id")
        if source == "local" and path is None:
            raise ConfigError(f"task {self.name!r}: source=local needs task.path (the eval file)")

    def records(self, split: str) -> list[dict[str, Any]]:
        """Raw records of `split` from the configured source."""
        if self.source == "hf":
            return load_hf_records(self.hf_id, self.hf_config,
                                   self.train_split if split == "train" else self.eval_split,
                                   offline_hint=self.offline_hint)
        file = self.train_path if split == "train" else self.path
        if file is None:
            raise ConfigError(f"task {self.name!r}: source=local split 'train' needs task.train_path")
        return read_records(file)

    def _load(self, split: str) -> list[Example]:
        rows = self.records(split)
        return [self.to_example(r, i, split) for i, r in enumerate(rows)]

    def field(self, record: dict[str, Any], names: Sequence[str], index: int) -> Any:
        """record[first of names present]; ConfigError naming the fields and the record's keys otherwise."""
        for name in names:
            if name in record:
                return record[name]
        raise ConfigError(f"task {self.name!r}: record {index} has none of the fields {list(names)}; it has "
                          f"{sorted(record)} (set task.input_field / task.output_field)")

    def to_example(self, record: dict[str, Any], index: int, split: str) -> Example:
        """Default mapping: prompt = input field, reference = target_text = output field."""
        key = self.field(record, self.id_field, index) if self.id_field else index
        output = str(self.field(record, self.output_field, index))
        return Example(uid=f"{self.name}/{split}/{key}", prompt=str(self.field(record, [self.input_field], index)),
                       reference=self.reference_of(output), target_text=self.target_of(output),
                       meta={"split": split})

    def reference_of(self, output: str) -> str:
        return output

    def target_of(self, output: str) -> str:
        return output


def _as_tuple(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: '9 * 2 = $<<9*2=18>>18' -> '9 * 2 = $18'."""
    return re.sub(r"<<[^<>]*>>", "", text)
