"""The documented commands, run verbatim as a user types them, in a temp copy of the repo.

Every `python run.py ...` / `python -m distillspec.report ...` line of the README's "Running", "Experiments and
reports" and vLLM sections and of every bash block in docs/*.md, and every `python run.py ...` printed inline in
the README or docs/, is either run here (shrunk only by
*appended* overrides: the tiny pair, a few prompts and steps, one point of an experiment's grid; `stage=plan`
loads no model and runs as typed) with the default output directories (`outputs/`, `multirun/` under the
copy), or listed in NOT_RUN_OFFLINE with the reason. A documented command that is neither fails the test, so
the README and docs/ cannot drift from what works.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SHARED_DATA, TINY

from distillspec import constants as C

SECTIONS = ("## Running", "## Experiments and reports", "## Serving and generating with vLLM")
COMMAND_PREFIXES = ("python run.py", "python -m distillspec")
LAUNCHERS = ("srun ",)  # `srun python run.py ...` (docs/gpu.md) is collected as its python command
# Commands that need the Hugging Face Hub, a GPU or a cluster (checked by substring), with the reason.
# `stage=plan` commands are run whatever they name: they load no model and need no Hub.
NOT_RUN_OFFLINE = {
    "task=gsm8k div=jsd": "loads GSM8K from the Hub",
    "pair=qwen3": "loads Qwen3 from the Hub",
    "experiment=reference_": "full-size pairs from the Hub, GPU",
    "experiment=recipe_grid": "full-size pairs from the Hub, GPU",
    "experiment=skd_speckd": "full-size pairs from the Hub, GPU",
    "experiment=adaptive_reference": "full-size pairs from the Hub, GPU",
    "pair.target=": "your own models: a local directory and a Hub id (docs/configuration.md)",
    "rollout.engine=vllm": "needs the serving env (make vllm): make test-vllm runs it (tests/test_readme_vllm.py)",
}


def _bash_commands(text: str) -> list[str]:
    """The command lines (comments and a LAUNCHERS prefix stripped) of the bash blocks in text, in order."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            cmd = line.split("#", 1)[0].strip()
            for launcher in LAUNCHERS:
                cmd = cmd.removeprefix(launcher)
            if cmd.startswith(COMMAND_PREFIXES):
                out.append(cmd)
    return out


def _inline_commands(text: str) -> list[str]:
    """The `python run.py ...` commands printed inline (in single backticks, outside fenced blocks), whitespace
    joined; a line that only describes a command (`python run.py stage=eval ...`) is not one."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    cmds = [" ".join(m.split()) for m in re.findall(r"(?<!`)`(python run\.py[^`]*)`", text)]
    return [c for c in cmds if "..." not in c]


def readme_commands() -> list[str]:
    """The commands of the README's SECTIONS, then of every docs/*.md (by name), then the inline ones of the
    README and docs, each once, in that order: later ones reuse what earlier ones wrote (the report reads the
    README's offline_reference sweep); a test run alone writes it first (_ensure_written)."""
    text = (REPO / "README.md").read_text()
    docs = [doc.read_text() for doc in sorted((REPO / "docs").glob("*.md"))]
    out: list[str] = []
    for section in SECTIONS:
        out += _bash_commands(text.split(section, 1)[1].split("\n## ", 1)[0])
    for doc in docs:
        out += _bash_commands(doc)
    for doc in [text, *docs]:
        out += _inline_commands(doc)
    return list(dict.fromkeys(out))


def _excused(cmd: str) -> bool:
    return "stage=plan" not in cmd.split() and any(s in cmd for s in NOT_RUN_OFFLINE)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def shrink(cmd: str) -> list[str]:
    """argv for `cmd` plus appended overrides that make it run in seconds (never replacing its own)."""
    argv = shlex.split(cmd)
    if argv[:2] != ["python", "run.py"] or "--cfg" in argv:
        return argv
    own = {_key(a) for a in argv[2:] if "=" in a}
    grid: dict[str, str] = {}
    for a in argv[2:]:  # one point of an experiment's grid (its last value: a trained method)
        if a.startswith("experiment="):
            exp = yaml.safe_load((REPO / "conf" / "experiment" / f"{a.split('=', 1)[1]}.yaml").read_text())
            params = (exp.get("hydra") or {}).get("sweeper", {}).get("params", {})
            grid.update({k: str(v).split(",")[-1] for k, v in params.items() if k not in own})
    if "stage=plan" in argv:  # loads no model: runs as typed, in seconds
        return argv
    groups = {k for k in own | set(grid) if "." not in k}  # a group the command or grid selects keeps its options
    extra = [o for o in TINY if _key(o) not in own | set(grid) and _key(o).split(".")[0] not in groups]
    # The tiny pair's tokenizer splits text into more tokens than the real pairs' do: an experiment's prompt-length
    # cap sized for those (offline_adaptive: 256 SmolLM2 tokens) would drop every DialogSum prompt.
    if "task.max_prompt_tokens" not in own:
        extra.append("task.max_prompt_tokens=512")
    return argv + extra + [f"{k}={v}" for k, v in grid.items()]


def _shrunk_run_dir(arg: str, repo: Path) -> str:
    """`draft_checkpoint=outputs/<name>/draft` (the draft of `python run.py experiment=<name>` typed as documented,
    whose run dir is outputs/<name>/) pointed at the draft the shrunk command wrote: its appended overrides name a
    run dir one level down, outputs/<name>/<overrides>/draft. When no earlier test wrote it (the test runs alone),
    the shrunk `python run.py experiment=<name>` runs here first, so each test stands alone."""
    key, _, value = arg.partition("=")
    value = value.strip()  # a folded YAML grid value starts with a space
    if key != "draft_checkpoint" or not re.fullmatch(r"outputs/[^/]+/draft", value) or (repo / value).exists():
        return arg
    _ensure_written(repo, (repo / value).parent, "*/draft", f"python run.py experiment={value.split('/')[1]}")
    below = sorted((repo / value).parent.glob("*/draft"))
    return f"{key}={below[0].relative_to(repo)}"


def _ensure_written(repo: Path, where: Path, pattern: str, producer: str) -> None:
    """Run the documented command `producer` (shrunk) in `repo` unless `where` already holds `pattern`."""
    if where.is_dir() and any(where.glob(pattern)):
        return
    proc = _run(shrink(producer), repo)
    assert proc.returncode == 0, f"`{producer}` (which writes {where.relative_to(repo)}) failed:\n{proc.stderr[-3000:]}"
    assert any(where.glob(pattern)), f"`{producer}` wrote no {where.relative_to(repo)}/{pattern}"


@pytest.fixture(scope="module")
def user_repo(tmp_path_factory) -> Path:
    """<tmp>/main: run.py, conf/, README.md as in a checkout; <tmp>/shared -> the real shared/ when present."""
    root = tmp_path_factory.mktemp("checkout")
    repo = root / "main"
    repo.mkdir()
    shutil.copy(REPO / "run.py", repo)
    shutil.copy(REPO / "README.md", repo)
    shutil.copytree(REPO / "conf", repo / "conf")
    if SHARED_DATA.is_dir():
        (root / "shared").symlink_to(SHARED_DATA.parent)
    return repo


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable if a == "python" else a for a in argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DISTILLSPEC_SHARED_DATA", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_every_readme_command_is_run_or_excused():
    cmds = readme_commands()
    assert any(c.startswith("python run.py -m div=") for c in cmds), cmds  # the parser found the sections
    assert any("stage=plan" in c for c in cmds) and any("experiment=recipe_grid" in c for c in cmds), cmds  # docs/
    for cmd in cmds:
        shrink(cmd)  # every experiment named in the README or docs/ exists


RUNNABLE = [c for c in readme_commands() if not _excused(c)]


@pytest.mark.parametrize("cmd", RUNNABLE)
def test_readme_command_runs_verbatim(user_repo, cmd):
    """One documented command (in readme_commands() order: later ones use what earlier ones wrote)."""
    if ("gsm8k_local" in cmd or "experiment=offline_adaptive" in cmd) and not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not beside the repo")
    demo_draft = "outputs/arithmetic-offline/draft"  # the demo's draft (here the shrunk demo's, on the tiny pair)
    if "<run>" in cmd or demo_draft in cmd:  # the README's placeholder: a run dir the first command wrote
        _ensure_written(user_repo, user_repo / "outputs", "*/*/draft", "python run.py")
        drafts = sorted((user_repo / "outputs").glob("*/*/draft"))
        cmd = re.sub(r"(outputs/)?<run>/draft", demo_draft, cmd).replace(demo_draft, str(drafts[0].relative_to(user_repo)))
    if "<name>" in cmd:
        _ensure_written(user_repo, user_repo / "multirun" / "offline_reference", f"*/{C.METRICS_FILE}",
                        "python run.py -m experiment=offline_reference")
        cmd = cmd.replace("multirun/<name>", "multirun/offline_reference")
    proc = _run([_shrunk_run_dir(a, user_repo) for a in shrink(cmd)], user_repo)
    assert proc.returncode == 0, f"`{cmd}` failed:\n{proc.stderr[-3000:]}"
    printed = re.findall(r"^  (python run.py stage=eval .*)$", proc.stdout + proc.stderr, flags=re.M)
    if cmd == "python run.py":  # it prints the exact command that evaluates its draft: paste it
        assert len(printed) == 1, proc.stdout[-2000:]
        again = _run(shlex.split(printed[0]), user_repo)
        assert again.returncode == 0, f"`{printed[0]}` failed:\n{again.stderr[-3000:]}"
    if cmd.startswith("python run.py -m div=fkl,rkl,jsd sd.gamma=3,5"):  # default dirs: multirun/<task>-<pair>/
        sweep = user_repo / "multirun" / "arithmetic-tiny"
        jobs = sorted(p for p in sweep.iterdir() if (p / C.METRICS_FILE).exists())
        assert len(jobs) == 6, [p.name for p in sweep.iterdir()]  # div x sd.gamma = 3 x 2
        for job in jobs:
            assert C.ALPHA_TOK in json.loads((job / C.METRICS_FILE).read_text())["metrics"]
    if cmd.startswith("python -m distillspec.report"):
        assert (user_repo / "multirun" / "offline_reference" / "report.md").exists()
