"""Test set-up: no Hub access, deterministic seeds, shared tiny models.

Helpers for individual areas live in their own test files; keep this file to shared fixtures.
"""

from __future__ import annotations

import os

# No network in tests: every HF load must be local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit  # noqa: E402
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from distillspec.resolvers import register  # noqa: E402

register()

# Teacher data that test runs build (rollout.cache_store) goes to a temp dir, not the user's cache; inherited
# by the run.py subprocesses the tests start.
_TEACHER_DATA = tempfile.mkdtemp(prefix="distillspec-teacher-data-")
os.environ["DISTILLSPEC_TEACHER_DATA"] = _TEACHER_DATA
atexit.register(shutil.rmtree, _TEACHER_DATA, ignore_errors=True)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and avoids OpenMP spin contention on busy machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(draft_dir, target_dir): a 4-layer tiny random Llama target and its 1-layer truncated draft."""
    from distillspec.models.tiny import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repo (GSM8K, Spec-Bench, DialogSum); tests needing it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def require_serving_env() -> None:
    """Skip (or fail under DISTILLSPEC_REQUIRE_VLLM=1, as make test-vllm sets) unless the serving env imports vllm."""
    from distillspec.errors import ConfigError
    from distillspec.serving.env import check_serving_python
    from distillspec.serving.jobs import default_vllm_python

    try:
        check_serving_python(default_vllm_python())
    except ConfigError as exc:
        if os.environ.get("DISTILLSPEC_REQUIRE_VLLM") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory) -> Path:
    """The python of a fake serving env (tests/fake_vllm.py), one per test module."""
    from fake_vllm import make_fake_env

    return make_fake_env(tmp_path_factory.mktemp("fake_vllm_env"))


def load_script(relpath: str, name: str):
    """A script of the repo that is not a package module (run.py, benchmarks/*.py), imported as module `name`."""
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# Overrides that shrink any run to seconds on a CPU: tiny random pair, a few prompts and steps.
TINY = [
    "pair=tiny", "trainer=cpu", "task=arithmetic", "task.num_train=32", "task.num_eval=8",
    "task.max_new_tokens=12", "train.max_steps=2", "train.batch_size=2", "train.num_train=16",
    "train.max_new_tokens=8", "train.checkpoint_every=1", "sd.num_eval=4", "sd.batch_size=2",
    "sd.max_new_tokens=8", "sd.gamma=3", "train.eval_every=0",
]


def compose_cfg(overrides: list[str] | None = None, run_dir: Path | None = None):
    """Compose the real conf/config.yaml with overrides (HydraConfig set, as in a real run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []), return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_cfg(overrides: list[str], run_dir: Path) -> dict:
    """Compose and run in-process (what run.py does), writing into run_dir."""
    from distillspec.runner import run

    cfg = compose_cfg(overrides, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(cfg, run_dir, REPO)
