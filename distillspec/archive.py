"""Copy a sweep's finished jobs without their weights, so that its results travel.

    python -m distillspec.archive multirun/<name> experiments/<name>/jobs    # keep the results (e.g. in git)
    python -m distillspec.archive experiments/<name>/jobs multirun/<name>    # on another machine: resume there

A finished job is a job dir holding metrics.json. Its copy holds every file of the job except the weights (the
trained `draft/`, the training `checkpoints/`), W&B's local run files and the launch locks: metrics.json,
per_example.json, run_config.json, .hydra/, csv/, run.log. The report reads such a copy as it reads the sweep
(`python -m distillspec.report experiments/<name>/jobs`), and a copy put back under the sweep dir makes a rerun
of the sweep report those jobs instead of redoing them (distillspec.rundir), so a grid that outlives one machine
resumes on the next. Each file is written whole (a temp file renamed into place); jobs without metrics.json are
left out, and a job already in the destination is overwritten file by file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from distillspec import constants as C

LEFT_OUT_DIRS = frozenset({"draft", "checkpoints", "wandb"})  # weights and W&B's local files
LEFT_OUT_FILES = frozenset({"run.lock", ".launch.lock"})


def job_files(job_dir: Path) -> list[Path]:
    """The files of `job_dir` that travel (paths relative to it), sorted; temp dirs (".<name>.tmp-*") stay."""
    kept = []
    for path in sorted(job_dir.rglob("*")):
        rel = path.relative_to(job_dir)
        parts = rel.parts
        if not path.is_file() or path.name in LEFT_OUT_FILES or ".tmp" in path.name:
            continue
        if any(p in LEFT_OUT_DIRS or (p.startswith(".") and ".tmp" in p) for p in parts[:-1]):
            continue
        kept.append(rel)
    return kept


def finished_jobs(src: Path) -> list[Path]:
    """Job dirs under `src` (itself included) that hold metrics.json, outside any left-out dir, sorted."""
    return sorted(p.parent for p in src.rglob(C.METRICS_FILE)
                  if not LEFT_OUT_DIRS.intersection(p.relative_to(src).parts[:-1]))


def copy_results(src: Path, dst: Path) -> list[Path]:
    """Copy each finished job under `src` to the same relative path under `dst` (module docstring); returns the
    destination job dirs. ValueError naming `src` when it is not a directory or holds no finished job."""
    if not src.is_dir():
        raise ValueError(f"{src} is not a directory; pass a sweep dir (multirun/<name>) or a copy of one")
    jobs = finished_jobs(src)
    if not jobs:
        raise ValueError(f"{src} holds no finished job (no {C.METRICS_FILE} under it); nothing to copy")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"{dst} is {src} or inside it; copy to a directory outside the sweep dir")
    copied = []
    for job in jobs:
        out_job = dst / job.relative_to(src)
        for rel in job_files(job):
            out = out_job / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            shutil.copy2(job / rel, tmp)
            tmp.replace(out)
        copied.append(out_job)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillspec.archive", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="a sweep dir (multirun/<name>) or a copy made by this command")
    parser.add_argument("dst", type=Path, help="where the finished jobs go (same relative paths)")
    args = parser.parse_args(argv)
    try:
        copied = copy_results(args.src, args.dst)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for job in copied:
        print(job)
    print(f"{len(copied)} finished job(s) copied to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
