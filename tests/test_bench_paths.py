"""Benchmark scripts keep their files at private or repo paths (issue 28, item 7): no fixed /tmp name another local
user could plant a file at, and nothing loaded with torch.load(weights_only=False)."""

from __future__ import annotations

import re

import torch
from conftest import REPO, load_script

from distillspec.rollout.sequences import assemble


class _RunsCode:
    """Unpickling this calls touch(marker): what a planted file could do to weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_probe_data_lives_in_the_repo_and_never_runs_code(tmp_path):
    probe = load_script("benchmarks/cached_probe.py", "cached_probe")  # importable: runs nothing (it did run)
    path = probe.data_path(128, 16, 1.0, 48)
    # under the repo's own outputs/ (wherever the clone sits, /tmp included), not a fixed shared path
    assert path.is_relative_to(REPO / "outputs")

    path = probe.data_path(4, 2, 0.6, 3, data_dir=tmp_path / "data")
    ids, mask = torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]])
    roll = assemble(ids, mask, torch.tensor([[7, 8, 1]]), torch.tensor([3]), 0, "teacher")
    logits = torch.randn(1, 3, 10)
    probe.save_data(path, [(roll, logits)], [(roll, logits * 2)])
    (evd, trd) = probe.load_data(path)
    assert torch.equal(evd[0][0].input_ids, roll.input_ids) and evd[0][0].prompt_len == roll.prompt_len
    assert torch.equal(trd[0][1], logits * 2) and trd[0][0].source == "teacher"
    assert probe.load_data(tmp_path / "missing.pt") is None

    marker = tmp_path / "code-ran"
    torch.save(_RunsCode(marker), path)  # a planted file
    assert probe.load_data(path) is None  # refused (and recomputed by the probe)
    assert not marker.exists()


def test_benchmarks_use_no_fixed_tmp_paths_or_unsafe_loads():
    for script in ("benchmarks/cached_probe.py", "benchmarks/bench_train.py"):
        src = (REPO / script).read_text()
        assert not re.search(r"""["']/tmp""", src), script
        assert "weights_only=False" not in src, script
    bench = load_script("benchmarks/bench_train.py", "bench_train")
    assert hasattr(bench, "run_child")  # the child's result goes to a file in a private temp dir
