"""The README's and docs' `rollout.engine=vllm` commands, run as typed (make test-vllm).

`make test`'s README check (tests/test_readme_commands.py) excuses them: they need the serving env, and vLLM's
CPU build cannot run the tiny pair it shrinks to (head size 16). Here each runs verbatim in a checkout-like dir
with the default pair (the offline SmolLM2 pair), in its default output dir, and only appended overrides that make
it short: the servers the run starts, their logs in the run dir and the run's metrics are checked.
"""

from __future__ import annotations

import json
import shlex

import pytest
from conftest import require_serving_env
from test_readme_commands import _key, _run, readme_commands, user_repo  # noqa: F401 - user_repo is a fixture

from distillspec import constants as C

pytestmark = [pytest.mark.real_model, pytest.mark.vllm, pytest.mark.timeout(1800)]

NOT_OFFLINE = ("pair=qwen3", "task=gsm8k", "rollout.vllm_url=")  # Hub models, or a server you started yourself
SHORT = ["train.max_steps=2", "train.num_train=8", "train.max_new_tokens=16", "sd.num_eval=2",
         "sd.max_new_tokens=16", "sd.measure_speedup=false", "sd.draft_quality=false", "train.eval_every=0"]
VLLM_COMMANDS = [c for c in readme_commands() if "rollout.engine=vllm" in c and not any(s in c for s in NOT_OFFLINE)]


def test_the_docs_have_vllm_commands_to_run():
    assert any(c == "python run.py rollout.engine=vllm" for c in VLLM_COMMANDS), VLLM_COMMANDS
    assert any("rollout.teacher_location=server" in c for c in VLLM_COMMANDS), VLLM_COMMANDS


@pytest.mark.parametrize("cmd", VLLM_COMMANDS)
def test_vllm_command_runs_verbatim(user_repo, cmd):  # noqa: F811 - the imported fixture
    require_serving_env()
    argv = shlex.split(cmd)
    own = {_key(a) for a in argv[2:] if "=" in a}
    before = set((user_repo / "outputs").rglob(C.METRICS_FILE))
    proc = _run(argv + [o for o in SHORT if _key(o) not in own], user_repo)
    assert proc.returncode == 0, f"`{cmd}` failed:\n{proc.stderr[-3000:]}"
    new = set((user_repo / "outputs").rglob(C.METRICS_FILE)) - before
    assert len(new) == 1, new  # one run, in the default output dir: outputs/<task>-<pair>/<overrides>/
    run = new.pop().parent
    assert C.ALPHA_EXPECTED in json.loads((run / C.METRICS_FILE).read_text())["metrics"]
    logs = {p.name for p in (run / "vllm_logs").iterdir()}
    student = "rollout=student" in argv
    served_teacher = not student or "rollout.teacher_location=server" in argv
    assert ("student-server.log" in logs) == student and ("teacher-server.log" in logs) == served_teacher, logs
