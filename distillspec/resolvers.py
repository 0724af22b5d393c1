"""OmegaConf resolvers used by conf/ (registered by run.py and the tests before Hydra composes).

`${choice:task}` is the option chosen in a config group (`task=gsm8k` -> `gsm8k`). It reads the
composed config's own `hydra.runtime.choices` when the config still holds its `hydra` node (the
multirun launcher resolves `hydra.sweep.dir` that way, before any job's HydraConfig exists) and
HydraConfig otherwise (inside a job, where Hydra has removed the `hydra` node).

`${pair_name:}` names the model pair in run directories: the `pair` group's option (`offline`, `qwen3`)
unless the command line sets `pair.target` or `pair.draft` (a local directory or an HF id), in which case
it is `<target>+<draft>` from the actual model names (last path component or the name after the HF
org: `pair.target=/models/SmolLM2-1.7B-Instruct` -> `SmolLM2-1.7B-Instruct+...`). A sweep over those
keys keeps the group option for the sweep directory (each job's own directory holds the values).

`${dirname:${hydra:job.override_dirname}}` keeps run/sweep directory names readable, legal and
pasteable: every character that a shell or Hydra's override grammar would treat specially is replaced
by '_' (so `draft_checkpoint=outputs/<run>/draft` works unquoted), and names longer than MAX_DIRNAME
characters are cut and suffixed with a hash of the full override string, so distinct command lines
still map to distinct (and stable, hence resumable) directories.
"""

from __future__ import annotations

import hashlib
import re

MAX_DIRNAME = 120
# Characters kept in directory names: safe unquoted in POSIX shells and in Hydra override values.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+\-@%]")


def short_dirname(name: str, limit: int = MAX_DIRNAME) -> str:
    """`name` with unsafe characters replaced by '_', cut to `limit` characters (+ '-' + 10 hex of sha1)."""
    safe = _UNSAFE.sub("_", name)
    if len(safe) <= limit:
        return safe
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{safe[: limit - 11]}-{digest}"


def group_choice(group: str, *, _root_) -> str:
    """The option selected in config group `group` (see the module docstring)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_node = _root_.get("hydra") if hasattr(_root_, "get") else None
    if hydra_node is not None:
        choices = hydra_node.runtime.choices
    elif HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
    else:
        raise ValueError(f"${{choice:{group}}} needs a Hydra-composed config")
    value = choices.get(group)
    if value is None:
        raise ValueError(f"config group {group!r} has no selected option; known: {sorted(choices)}")
    return str(value)


PAIR_KEYS = ("pair.target", "pair.draft")


def _hydra_node(_root_):
    """The `hydra` node: the config's own before any job exists, HydraConfig's inside a job."""
    from hydra.core.hydra_config import HydraConfig

    node = _root_.get("hydra") if hasattr(_root_, "get") else None
    if node is not None:
        return node
    if HydraConfig.initialized():
        return HydraConfig.get()
    raise ValueError("this resolver needs a Hydra-composed config")


def model_name(spec: str) -> str:
    """A short model name for directory names: `/a/b/Model/` -> `Model`, `org/Model` -> `Model`,
    `offline:smollm2-135m-L4` -> `smollm2-135m-L4`."""
    text = str(spec).rstrip("/\\")
    if ":" in text and not text.startswith(("/", ".", "~")):
        text = text.split(":", 1)[1]
    return short_dirname(text.replace("\\", "/").rsplit("/", 1)[-1] or text, limit=60)


def pair_name(*, _root_) -> str:
    """The pair's name in run directories (see the module docstring)."""
    overrides = [str(o) for o in _hydra_node(_root_).overrides.task]
    values = {}
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in PAIR_KEYS:
            values[key] = value
    choice = group_choice("pair", _root_=_root_)
    pair = _root_.get("pair")
    if not values or pair is None:
        return choice
    actual = {k: str(pair.get(k.split(".", 1)[1])) for k in PAIR_KEYS}
    if any(actual[k] != v for k, v in values.items()):  # a sweep (a,b / range(...)): not one pair
        return choice
    return f"{model_name(actual['pair.target'])}+{model_name(actual['pair.draft'])}"


def run_name(name: str) -> str:
    """`${runname:${name}}`: the run name, validated (distillspec.rundir.check_name) before Hydra creates
    outputs/<name>/..., so `name=../../x` cannot write outside outputs/ and multirun/."""
    from distillspec.rundir import check_name

    return check_name(name)


def register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("runname"):
        OmegaConf.register_new_resolver("runname", run_name)

    if not OmegaConf.has_resolver("dirname"):
        OmegaConf.register_new_resolver("dirname", short_dirname)
    if not OmegaConf.has_resolver("pair_name"):
        OmegaConf.register_new_resolver("pair_name", pair_name)
    if not OmegaConf.has_resolver("choice"):
        OmegaConf.register_new_resolver("choice", group_choice)

    from distillspec.warm_cells import register_cells

    register_cells()  # conf/'s generated config group warm_cell (distillspec.warm_cells)
