"""OmegaConf resolvers used by conf/ (registered by run.py and the tests before Hydra composes).

`${choice:task}` is the option chosen in a config group (`task=gsm8k` -> `gsm8k`). It reads the
composed config's own `hydra.runtime.choices` when the config still holds its `hydra` node (the
multirun launcher resolves `hydra.sweep.dir` that way, before any job's HydraConfig exists) and
HydraConfig otherwise (inside a job, where Hydra has removed the `hydra` node).

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
    if not OmegaConf.has_resolver("choice"):
        OmegaConf.register_new_resolver("choice", group_choice)
