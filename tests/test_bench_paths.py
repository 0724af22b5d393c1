"""Benchmark scripts keep their files at private or repo paths: no fixed /tmp name another local user could plant
a file at, and nothing loaded with torch.load(weights_only=False)."""

from __future__ import annotations

import re

from conftest import REPO, load_script


def test_benchmarks_use_no_fixed_tmp_paths_or_unsafe_loads():
    for script in sorted(p.relative_to(REPO).as_posix() for p in (REPO / "benchmarks").rglob("*.py")):
        src = (REPO / script).read_text()
        assert not re.search(r"""["']/tmp""", src), script
        assert "weights_only=False" not in src, script
    bench = load_script("benchmarks/bench_train.py", "bench_train")
    assert hasattr(bench, "run_child")  # the child's result goes to a file in a private temp dir
