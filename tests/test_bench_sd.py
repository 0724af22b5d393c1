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
