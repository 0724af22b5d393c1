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

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


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
