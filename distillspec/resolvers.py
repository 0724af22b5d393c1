"""OmegaConf resolvers used by conf/ (registered by run.py and the tests before Hydra composes).

`${dirname:${hydra:job.override_dirname}}` keeps run/sweep directory names readable and legal: names
longer than MAX_DIRNAME characters are cut and suffixed with a hash of the full override string, so
distinct command lines still map to distinct (and stable, hence resumable) directories.
"""

from __future__ import annotations

import hashlib

MAX_DIRNAME = 120


def short_dirname(name: str, limit: int = MAX_DIRNAME) -> str:
    """`name` if it fits in `limit` characters, else its first characters + '~' + 10 hex digits of sha1."""
    name = name.replace("/", "_")
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: limit - 11]}~{digest}"


def register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("dirname"):
        OmegaConf.register_new_resolver("dirname", short_dirname)
