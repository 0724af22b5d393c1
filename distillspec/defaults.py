"""The settings' defaults, read from conf/ (the YAML is their one source; the spec dataclasses hold none).

A run gets every value from its composed config. Code that builds a spec outside a run (tests, benchmarks,
the GPU check) takes the YAML's defaults and changes only what it names:

    from distillspec.defaults import build_spec
    sd = build_spec(SDSpec, gamma=3, temperature=0.0)   # conf/config.yaml's default sd= option, gamma and T changed
    gate = build_spec(GateSpec)                         # div=speckd's gate

The defaults are those of `python run.py` with no overrides (composed once per process with Hydra's compose
API; `options` picks other group options first, e.g. `build_spec(SDSpec, options=["sd=greedy"])`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence, TypeVar

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
T = TypeVar("T")

# spec class name -> (its node in the composed config, the group options that give it values)
NODES = {
    "SDSpec": ("sd", ()),
    "ObjectiveSpec": ("div", ()),
    "GateSpec": ("div.gate", ("div=speckd",)),
    "RolloutSpec": ("rollout", ()),
    "TrainSpec": ("train", ()),
    "PairSpec": ("pair", ()),
}


@functools.cache
def _node(path: str, options: tuple[str, ...]) -> dict[str, Any]:
    """The composed config's node at dotted `path` under group `options`, resolved, without `_target_`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from distillspec.resolvers import register

    register()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or an open compose context: its search path
        cfg = compose(config_name="config", overrides=list(options))
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(options))
    node = OmegaConf.select(cfg, path)
    values = OmegaConf.to_container(node, resolve=True)
    values.pop("_target_", None)
    return values


def spec_defaults(cls: type, options: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML's values for every field of spec class `cls` (a fresh dict)."""
    if cls.__name__ not in NODES:
        raise ValueError(f"no config node for {cls.__name__}; valid: {', '.join(NODES)}")
    path, base = NODES[cls.__name__]
    return dict(_node(path, tuple(base) + tuple(options)))


def build_spec(cls: type[T], options: Sequence[str] = (), **overrides: Any) -> T:
    """`cls` with the YAML's defaults (under group `options`) and `overrides`, validated as a run validates it."""
    return cls(**{**spec_defaults(cls, options), **overrides})
