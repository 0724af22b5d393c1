"""A 2-job Hydra sweep on the tiny pair, then the report: files exist and the tables hold the jobs' numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO, TINY

from distillspec import constants as C
from distillspec.report import (FIG_ENTROPY, REPORT_MD, SUMMARY_CSV, bootstrap_ci, main, mark_seeds, plots,
                                recipe_table, seed_table)


def test_bootstrap_ci_brackets_the_ratio():
    import numpy as np

    num = np.array([1, 2, 3, 4, 5, 0, 2], float)
    den = np.array([5, 5, 5, 5, 5, 5, 5], float)
    lo, hi = bootstrap_ci(num, den)
    assert lo < num.sum() / den.sum() < hi
    assert 0 <= lo and hi <= 1


def test_paired_bootstrap_sees_a_shift_the_prompts_hide():
    """Prompts that differ widely in acceptance, and a second run accepting one more token on each: the unpaired
    CIs overlap, the paired CI of the difference is tight around the shift and excludes 0."""
    import numpy as np

    from distillspec.sd.metrics import paired_bootstrap_ci

    rng = np.random.default_rng(1)
    den = np.full(64, 100.0)
    num_a = rng.integers(10, 90, 64).astype(float)
    num_b = num_a + 1.0
    diff, lo, hi = paired_bootstrap_ci(num_a, den, num_b, den)
    assert diff == pytest.approx(0.01)
    assert 0 < lo <= 0.01 <= hi < 0.02
    lo_a, hi_a = bootstrap_ci(num_a, den)
    lo_b, hi_b = bootstrap_ci(num_b, den)
    assert lo_b < hi_a  # unpaired, the two runs are indistinguishable
    assert paired_bootstrap_ci(num_a, den, num_a, den) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same prompts in both runs"):
        paired_bootstrap_ci(num_a, den, num_b[:-1], den[:-1])


def test_recipe_table_places_each_job_in_its_cell():
    rows = [("baseline", None, 0.010), ("fkl/fixed", "fixed", 0.020), ("fkl", "student", 0.030),
            ("rkl/fixed", "fixed", 0.040), ("rkl", "student", 0.015)]
    df = pd.DataFrame([{"method": m, "rollout": r, "gamma": 5, "temperature": 1.0, C.ALPHA_TOK: a} for m, r, a in rows])
    lines = recipe_table(df).splitlines()
    assert "untrained baseline α_tok 1.00" in lines[0]
    assert lines[2] == "| data source | fkl | rkl |"
    assert lines[4] == "| fixed | 2.00 | **4.00** |"
    assert lines[5] == "| student | 3.00 | 1.50 |"
    assert recipe_table(df[df["rollout"] != "fixed"]) == ""  # one data source: no recipe grid


def test_a_second_seed_is_its_own_row_and_stays_out_of_the_recipe_grid():
    """offline_warm reruns its leading cells with another seed: they must not overwrite (or be picked over) the
    sweep's first seed."""
    rows = [("fkl/teacher", "teacher", 1, 0.30), ("fkl/teacher", "teacher", 2, 0.50), ("fkl", "student", 1, 0.2),
            ("rkl/teacher", "teacher", 1, 0.25)]
    df = pd.DataFrame([{"method": m, "rollout": r, "seed": s, "gamma": 5, "temperature": 1.0, C.ALPHA_TOK: a,
                        C.ALPHA_SEQ: a, C.ALPHA_EXPECTED: a} for m, r, s, a in rows])
    assert mark_seeds(df[df["seed"] == 1]).equals(df[df["seed"] == 1])  # one seed: labels unchanged
    df = mark_seeds(df)
    assert list(df["method"]) == ["fkl/teacher", "fkl/teacher@seed2", "fkl", "rkl/teacher"]
    grid = recipe_table(df).splitlines()
    assert grid[2] == "| data source | fkl | rkl |"
    assert grid[5] == "| teacher | **30.00** | 25.00 |"  # seed 0's value, not seed 1's 50.00
    seeds = seed_table(df).splitlines()
    assert seeds[2:] == ["| fkl/teacher | 1 | 30.00 | 30.00 | 30.00 |", "| fkl/teacher | 2 | 50.00 | 50.00 | 50.00 |"]
    assert seed_table(df[df["seed"] == 1]) == ""


def test_recipe_entropy_figure_has_one_panel_per_data_source(tmp_path):
    import matplotlib.image

    bins = [{"bin_lo": 0.01, "bin_hi": 0.1, "count": 10.0, "acceptance": 0.5},
            {"bin_lo": 0.1, "bin_hi": 1.0, "count": 30.0, "acceptance": 0.2}]
    rows = [("baseline", "mixed"), ("fkl/fixed", "fixed"), ("fkl", "student"), ("rkl/teacher", "teacher")]
    df = pd.DataFrame([{"method": m, "rollout": r, "gamma": 5, "temperature": 1.0, C.ALPHA_TOK: 0.1,
                        "_entropy_bins": bins, "_eval_history": []} for m, r in rows])
    from distillspec.report_plots import entropy_figure

    for name, data, panels in (("grid", df, 3), ("single", df[df["rollout"].isin(["mixed", "student"])], 1)):
        out = tmp_path / name
        out.mkdir()
        assert out / FIG_ENTROPY in plots(data, out)
        assert matplotlib.image.imread(out / FIG_ENTROPY).shape[1] > 0
        assert len(entropy_figure(data).axes) == panels  # 3 data-source panels vs one panel


def test_two_job_sweep_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "run.py", "-m", *TINY, "method=baseline,rkl",
                          f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(sweep.rglob(C.METRICS_FILE))
    assert len(jobs) == 2
    main([str(sweep)])
    for name in (SUMMARY_CSV, REPORT_MD, FIG_ENTROPY):
        assert (sweep / name).exists(), name
    df = pd.read_csv(sweep / SUMMARY_CSV)
    assert sorted(df["method"]) == ["baseline", "rkl/teacher"]  # default rollout: teacher
    for p in jobs:
        m = json.loads(p.read_text())["metrics"]
        assert any(abs(v - m[C.ALPHA_TOK]) < 1e-9 for v in df[C.ALPHA_TOK])
    md = (sweep / REPORT_MD).read_text()
    assert "baseline α_seq" in md and "rkl/teacher α_tok" in md
    best = df[C.ALPHA_TOK].max()
    assert f"**{100 * best:.2f}" in md  # the best α_tok is bold
    # what the loss saw: the trained job's share of training tokens per teacher-entropy bin, from its CSV
    from distillspec.report import train_entropy_shares

    trained = next(p.parent for p in jobs if json.loads(p.read_text())["stage"] == "train_eval")
    shares = train_entropy_shares(trained / "csv" / "metrics.csv")
    assert shares and sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    section = md.split("## Teacher entropy of the training tokens")[1].split("##")[0]
    assert "| rkl/teacher |" in section and "| baseline |" not in section
    # every job with its CIs: alpha_expected and tau too
    per_job = md.split("## Per job")[1].split("##")[0]
    for _, r in df.iterrows():
        assert f"| {r['method']} |" in per_job and f"{100 * r[C.ALPHA_EXPECTED]:.2f} [" in per_job
        assert f"{r[C.BLOCK_EFFICIENCY]:.3f} [" in per_job
    # the trained job against the untrained draft on the same prompts: the difference of their alpha_tok
    paired = md.split("## Against the untrained draft")[1].split("##")[0]
    by_method = df.set_index("method")[C.ALPHA_TOK]
    diff = 100 * (by_method["rkl/teacher"] - by_method["baseline"])
    assert f"| rkl/teacher | " in paired and f"{diff:+.2f} [" in paired and "| baseline |" not in paired


def _fake_job(job_dir, alpha):
    """A finished eval job's files, as run.py writes them (only what the report reads)."""
    (job_dir / ".hydra").mkdir(parents=True)
    metrics = {C.ALPHA_TOK: alpha, C.ALPHA_SEQ: alpha, C.ALPHA_EXPECTED: alpha, C.GAMMA: 3, C.NUM_DRAFTED: 30}
    (job_dir / C.METRICS_FILE).write_text(json.dumps({"stage": "eval", "task": "Arithmetic", "draft": "d",
                                                      "target": "t", "metrics": metrics}))
    (job_dir / ".hydra" / "config.yaml").write_text("sd: {gamma: 3, temperature: 0.0}\nseed: 0\n")


def test_a_trained_draft_evaluated_again_is_named_after_its_training(tmp_path):
    """stage=eval draft_checkpoint=<run>/draft (another SD setting for a trained draft): the report's row carries
    the training run's label and starting draft, so it pairs with the untrained draft of the same setting."""
    from distillspec.report_jobs import collect

    trained = tmp_path / "grid" / "1_method-fkl"
    _fake_job(trained, 0.6)
    saved = json.loads((trained / C.METRICS_FILE).read_text())
    (trained / C.METRICS_FILE).write_text(json.dumps({**saved, "stage": "train_eval"}))
    (trained / ".hydra" / "config.yaml").write_text("div: {divergence: fkl}\nrollout: {source: teacher}\n")
    sweep = tmp_path / "greedy"
    _fake_job(sweep / "0_untrained", 0.5)
    _fake_job(sweep / "1_fkl", 0.7)
    job = sweep / "1_fkl"
    saved = json.loads((job / C.METRICS_FILE).read_text())
    (job / C.METRICS_FILE).write_text(json.dumps({**saved, "draft": str(trained / "draft")}))
    (job / ".hydra" / "config.yaml").write_text(f"draft_checkpoint: {trained / 'draft'}\n"
                                                "sd: {gamma: 3, temperature: 0.0}\nseed: 0\n")
    df = collect(sweep).set_index("method")
    assert sorted(df.index) == ["baseline", "fkl/teacher"]
    assert df.loc["fkl/teacher", "draft"] == df.loc["baseline", "draft"] == "d"


def test_a_malformed_trained_by_is_named_as_damaged(tmp_path):
    from distillspec.jsonio import DamagedFileError
    from distillspec.report_jobs import load_job

    _fake_job(tmp_path / "job", 0.5)
    path = tmp_path / "job" / C.METRICS_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), C.TRAINED_BY: {"method": 3}}))
    with pytest.raises(DamagedFileError, match=f"{path} is damaged: {C.TRAINED_BY} is not"):
        load_job(path)


def test_a_damaged_job_is_listed_as_unreadable_and_the_others_are_reported(tmp_path, caplog):
    """One damaged metrics.json (or config.yaml) is named in one line and the other jobs are still reported."""
    sweep = tmp_path / "sweep"
    _fake_job(sweep / "0_good", 0.5)
    _fake_job(sweep / "1_cut", 0.6)
    _fake_job(sweep / "2_badcfg", 0.7)
    text = (sweep / "1_cut" / C.METRICS_FILE).read_text()
    (sweep / "1_cut" / C.METRICS_FILE).write_text(text[: len(text) // 2])
    (sweep / "2_badcfg" / ".hydra" / "config.yaml").write_text("sd: {gamma: 3\n  seed: [\n")
    main([str(sweep)])
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 2 and all(len(line.splitlines()) == 1 for line in lines)  # one line per damaged job
    assert f"{sweep / '1_cut' / C.METRICS_FILE} is damaged: not valid JSON (Unterminated string" in lines[0]
    assert f"{sweep / '2_badcfg' / '.hydra' / 'config.yaml'} is damaged: not valid YAML (expected ',' or '}}', " \
           "but got ':': line 2 column 7)" in lines[1]
    df = pd.read_csv(sweep / SUMMARY_CSV)
    assert sorted(zip(df["job"].map(lambda j: j.rsplit("/", 1)[-1]), df["status"])) == [
        ("0_good", "ok"), ("1_cut", "unreadable"), ("2_badcfg", "unreadable")]
    assert df.loc[df["status"] == "ok", C.ALPHA_TOK].tolist() == [0.5]
    md = (sweep / REPORT_MD).read_text()
    assert "1 jobs with SD metrics, 2 unreadable (see Unreadable jobs)." in md
    section = md.split("## Unreadable jobs")[1].split("##")[0]
    assert "| 1_cut " in section and "| 2_badcfg " in section and "| 0_good " not in section


def test_report_on_a_read_only_sweep_dir_says_to_pass_out(tmp_path, monkeypatch, capsys):
    """A read-only sweep dir is refused in one line that names --out. (As root chmod
    does not stop writes: the read-only directory is simulated through os.access, which the check reads.)"""
    import os

    sweep = tmp_path / "sweep"
    _fake_job(sweep / "0_good", 0.5)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if str(p) == str(sweep) and m & os.W_OK
                        else real(p, m, *a, **k))
    with pytest.raises(SystemExit) as exc:
        main([str(sweep)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == C.EXIT_CONFIG_ERROR and err.splitlines() == [err]
    assert err.startswith(f"error: cannot write the report into {sweep} ") and "pass --out <dir>" in err
    assert not (sweep / SUMMARY_CSV).exists()
    main([str(sweep), "--out", str(tmp_path / "elsewhere")])  # the hint works
    assert (tmp_path / "elsewhere" / SUMMARY_CSV).exists()
    # a report file that cannot be replaced (not the directory) gets the same line, naming the file
    monkeypatch.setattr(os, "access", real)
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, path, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(path))))
    with pytest.raises(SystemExit):
        main([str(sweep)])
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and f"({sweep / SUMMARY_CSV}: Permission denied)" in err and "--out" in err


def test_offline_warm_labels_come_from_the_composed_configs():
    """method_label (report.LABEL_PARTS) gives each of offline_warm's 23 cells, composed now, the label that the
    committed report (experiments/offline_warm/summary.csv, from job dirs <n>_+warm_cell-<cell>) shows."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf, open_dict

    from distillspec.report import SEED_MARK, method_label

    summary = pd.read_csv(REPO / "experiments" / "offline_warm" / "summary.csv")
    assert len(summary) == 23
    for job, shown in zip(summary["job"], summary["method"]):
        cell = job.rsplit("+warm_cell-", 1)[1]
        cfg = compose_cfg(["experiment=offline_warm", f"+warm_cell={cell}"])
        with open_dict(cfg):
            del cfg["hydra"]  # as a job's .hydra/config.yaml holds it
        saved = OmegaConf.to_container(cfg, resolve=True)
        label = method_label(saved, saved["stage"])
        assert (label if saved["seed"] == 1 else f"{label}{SEED_MARK}{saved['seed']}") == shown, cell
