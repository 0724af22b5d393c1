"""bench-sd measures any pair given by paths (--target/--draft) through the run's own evaluator."""

from __future__ import annotations

from conftest import load_script


def test_bench_sd_takes_any_pair_and_prints_evaluator_table(tiny_pair_dirs, capsys, one_thread):
    draft_dir, target_dir = tiny_pair_dirs
    bench = load_script("benchmarks/bench_sd.py", "bench_sd")
    bench.main(["--target", str(target_dir), "--draft", str(draft_dir), "--task", "arithmetic", "--batch", "2",
                "--new-tokens", "8", "--gamma", "3", "--repeats", "1", "--nocache-tokens", "4", "--skip-hf",
                "--threads", "1"])
    out = capsys.readouterr().out
    assert f"target {target_dir} (4 layers); drafts {draft_dir} (1 layers)" in out
    assert "pred. τ/(cvγ+v)" in out and "| v " in out
    for b in (1, 2):  # measured vs the v-corrected prediction at batch 1 and --batch, and the phase split
        assert f"(e) measured speedup vs τ/(cvγ+v) ({draft_dir.name}, B={b}, greedy)" in out
        assert f"| {draft_dir.name}, B={b}, T=0 " in out
    assert out.count("2/2") >= 2  # SD outputs equal target-only greedy at both batch sizes
    assert "(a) engine / no-cache tokens/s (B=2, γ=3, 4 tok" in out and "2/2 vs ours" in out


def test_bench_sd_compares_several_drafts_against_one_target(tiny_pair_dirs, tmp_path, capsys, one_thread):
    import shutil

    draft_dir, target_dir = tiny_pair_dirs
    trained = tmp_path / "1_method-fkl" / "draft"
    shutil.copytree(draft_dir, trained)
    bench = load_script("benchmarks/bench_sd.py", "bench_sd")
    bench.main(["--target", str(target_dir), "--draft", str(draft_dir), str(trained), "--task", "arithmetic",
                "--batch", "2", "--new-tokens", "8", "--gamma", "3", "--repeats", "1", "--skip-nocache", "--skip-hf",
                "--skip-batch1", "--skip-sampled", "--threads", "1"])
    out = capsys.readouterr().out
    for label in (draft_dir.name, "1_method-fkl/draft"):
        assert f"| {label}, B=2, T=0 " in out  # each draft's own SD row and phase split


def test_draft_labels_name_the_run_a_trained_draft_came_from():
    bench = load_script("benchmarks/bench_sd.py", "bench_sd")
    assert bench.draft_label("offline:smollm2-135m-L4") == "L4"
    assert bench.draft_label("multirun/qwen_coder_gsm8k/1_method-fkl/draft/") == "1_method-fkl/draft"
    assert bench.draft_label("/models/qwen-0.5b") == "qwen-0.5b"
