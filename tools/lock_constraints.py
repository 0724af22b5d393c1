"""Write constraints.txt: the exact versions installed in this environment of distillspec's dependencies.

    python tools/lock_constraints.py > constraints.txt      # what `make lock` runs

Walks the installed distribution's requirements (all extras that are installed) recursively and prints one
`name==version` line per package reached, sorted. torch is left out, with everything only torch pulls in: the
Makefile installs it first from TORCH_SPEC (the CPU wheel here, a CUDA build on GPU machines), and a pinned
torch requirement would let pip replace that build. Packages not installed (an extra such as `cuda` that
this environment lacks) are listed in a comment.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement

PROJECT = "distillspec"
UNPINNED = {"torch"}  # installed first, from the Makefile's TORCH_SPEC


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def closure(project: str) -> tuple[dict[str, str], set[str]]:
    """({canonical name: 'Name==version'}, names required but not installed)."""
    root = metadata.distribution(project)
    pending = [(project, set(root.metadata.get_all("Provides-Extra") or []))]
    pinned: dict[str, str] = {}
    missing: set[str] = set()
    seen: set[tuple[str, frozenset]] = set()
    while pending:
        name, extras = pending.pop()
        if (canon(name), frozenset(extras)) in seen:
            continue
        seen.add((canon(name), frozenset(extras)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.add(canon(name))
            continue
        if canon(name) != canon(project):
            pinned[canon(name)] = f"{dist.metadata['Name']}=={dist.version}"
        for line in dist.requires or []:
            req = Requirement(line)
            if canon(req.name) not in UNPINNED and wanted(req, extras):
                pending.append((req.name, set(req.extras)))
    return pinned, missing - set(pinned)


def main() -> None:
    pinned, missing = closure(PROJECT)
    print("# Tested versions of distillspec's dependencies (pip constraints; `make install` uses them).")
    print("# Regenerate with `make lock`; install unpinned with `make install CONSTRAINTS=`.")
    print("# torch is not pinned here: the Makefile installs it first from TORCH_SPEC (torch==2.13.0).")
    py = sys.version_info
    print(f"# Generated with Python {py.major}.{py.minor} on {sys.platform}.")
    if missing:
        print(f"# Not installed when generated (not pinned): {', '.join(sorted(missing))}")
    for key in sorted(pinned):
        print(pinned[key])


if __name__ == "__main__":
    main()
