"""distillspec entry point.

    python run.py                                   # distil the offline draft on the built-in task, evaluate
    python run.py task=gsm8k div=jsd                # another task / divergence
    python run.py -m div=fkl,rkl,jsd sd.gamma=3,5   # Hydra multirun sweep (multirun/<name>/...)
    python run.py stage=eval pair.draft=<id or dir> # measure a draft with no training
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distillspec.errors import ConfigError
from distillspec.resolvers import register

register()  # before @hydra.main composes the config

log = logging.getLogger("distillspec")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from distillspec.runner import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, run_dir, Path(hydra.utils.get_original_cwd()))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
