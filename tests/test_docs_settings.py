"""Every setting the README and docs/ print inline (`key=value` in backticks) is a real override: it composes
with the real conf/ and every spec it touches accepts it, as `python run.py <it>` would at launch.

Inline `python run.py ...` commands are run by tests/test_readme_commands.py with the fenced ones.
"""

from __future__ import annotations

import re
import pytest
from conftest import CONF_DIR, REPO, SHARED_DATA, compose_cfg

from distillspec.runner import build

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OVERRIDE = re.compile(r"`([+~]?[a-z_]+(?:\.[a-z_0-9]+)*=[^`\s]*)`")
SPEC_NODES = ("task", "pair", "sd", "div", "rollout", "train")
# Settings the docs print in a sentence that names what they go with; composed together with it.
REQUIRES = {
    "rollout.teacher_location=server": ["rollout.engine=vllm"],
    "pair.verify_full_precision=true": ["pair.target_quantization=8bit"],
    "rollout.source=mixed": ["rollout=mixed"],
}
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def _roots() -> set[str]:
    """Top-level keys of the composed config and the config groups: what an override's first segment may be."""
    return set(compose_cfg().keys()) | set(GROUPS) - {"hydra"}


def _variants(override: str) -> list[str]:
    """The override as a user would type it: placeholders filled (`<name>` with the group's first option,
    `[...]` with an empty list), `a|b` alternatives split."""
    key, value = override.split("=", 1)
    if value.startswith("<") and value.endswith(">"):
        group = key.lstrip("+~")
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else []
        value = options[0] if options else "x"
    value = re.sub(r"<[^>]+>", "x", value).replace("[...]", "[]")
    if not value:
        return []  # `+warm_cell=` names the setting, not a value
    values = value.split("|") if not value.startswith(("[", "{")) else [value]
    return [f"{key}={v}" for v in values]


def documented_settings() -> list[tuple[str, str]]:
    """(doc file, override) for every inline config override of the README and docs/, each once."""
    roots = _roots()
    out: dict[str, str] = {}
    for doc in DOCS:
        for override in OVERRIDE.findall(doc.read_text()):
            if override.split("=", 1)[0].lstrip("+~").split(".")[0] in roots:
                for v in _variants(override):
                    out.setdefault(v, doc.name)
    return [(doc, ov) for ov, doc in out.items()]


SETTINGS = documented_settings()


def test_the_docs_print_settings():
    printed = {ov for _, ov in SETTINGS}
    assert {"rollout.cache_store=false", "sd.gamma=auto", "resume=force"} <= printed, sorted(printed)


@pytest.fixture(scope="module")
def compose():
    """compose(overrides) over the real conf/, Hydra initialised once for the module (seconds saved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    def _compose(overrides: list[str]):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield _compose


@pytest.mark.parametrize("doc, override", SETTINGS, ids=[ov for _, ov in SETTINGS])
def test_documented_setting_composes_and_validates(compose, doc, override):
    if "specbench" in override and not SHARED_DATA.is_dir():  # Spec-Bench's prompts come from ../shared/data
        pytest.skip("../shared/data not beside the repo")
    # Hydra's own errors: an unknown key, `+` on a key that exists, a bad group option
    cfg = compose(REQUIRES.get(override, []) + [override])
    key = override.split("=", 1)[0].lstrip("+~")
    touched = [n for n in SPEC_NODES if key == n or key.startswith(n + ".")]
    if key.split(".")[0] in ("experiment", "method", "warm_cell"):  # files that set keys of many groups
        touched = list(SPEC_NODES)
    for node in touched:
        if key.startswith("draft_checkpoint") or cfg.get(node) is None:
            continue
        build(cfg[node], node)  # the spec's own checks, as at launch (ConfigError names the setting)


def test_an_undocumented_key_would_fail(compose):
    """The check can fail: a key no YAML holds is refused by Hydra."""
    with pytest.raises(Exception, match="not in struct|Could not override"):
        compose(["rollout.no_such_key=1"])
