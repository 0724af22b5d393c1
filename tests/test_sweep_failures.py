"""One bad job does not stop a Hydra multirun. A failed job is recorded (its error.json, the
sweep's failures.jsonl), the others run, the launch exits non-zero naming it, the report shows it as a failed row,
and a rerun of the sweep runs it again while finished jobs report their saved results."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
from conftest import REPO, TINY

from distillspec import constants as C
from distillspec.report import REPORT_MD, SUMMARY_CSV, main


def _sweep(sweep):
    args = [a for a in TINY if not a.startswith("sd.gamma=")]
    return subprocess.run([sys.executable, "run.py", "-m", *args, "stage=eval", "sd.num_eval=2", "sd.gamma=0,3",
                           f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_failed_sweep_job_is_recorded_the_sweep_goes_on_and_a_rerun_retries_it(tmp_path):
    sweep = tmp_path / "sweep"
    out = _sweep(sweep)
    assert out.returncode == C.EXIT_CONFIG_ERROR, out.stderr[-3000:]
    (bad,) = sweep.glob("0_*")
    (good,) = sweep.glob("1_*")
    assert f"{bad.name}: ConfigError: sd.gamma=0 is invalid" in out.stderr and "1 sweep job(s) failed" in out.stderr
    err = json.loads((bad / C.ERROR_FILE).read_text())
    assert err["exit_code"] == C.EXIT_CONFIG_ERROR and err["error_type"] == "ConfigError"
    assert "sd.gamma=0" in err["overrides"] and "Traceback" in (bad / C.ERROR_TRACEBACK_FILE).read_text()
    assert (good / C.METRICS_FILE).exists() and not (good / C.ERROR_FILE).exists()  # the next job ran
    assert [f["job"] for f in map(json.loads, (sweep / C.FAILURES_FILE).read_text().splitlines())] == [bad.name]

    main([str(sweep)])
    df = pd.read_csv(sweep / SUMMARY_CSV)
    assert sorted(df["status"]) == ["failed", "ok"]
    assert "## Failed jobs" in (sweep / REPORT_MD).read_text() and bad.name in (sweep / REPORT_MD).read_text()

    stamp, done = (bad / C.ERROR_FILE).stat().st_mtime_ns, (good / C.METRICS_FILE).stat().st_mtime_ns
    again = _sweep(sweep)  # a rerun: the failed job is attempted again, the finished one is reported
    assert again.returncode == C.EXIT_CONFIG_ERROR and bad.name in again.stderr
    assert (bad / C.ERROR_FILE).stat().st_mtime_ns != stamp
    assert (good / C.METRICS_FILE).stat().st_mtime_ns == done
    assert len((sweep / C.FAILURES_FILE).read_text().splitlines()) == 1  # this launch's failures only
