"""On-disk store for teacher caches, so jobs that share their teacher data build it once.

A sweep over divergences (`-m div=fkl,rkl,jsd`) gives every job the same prompts, teacher, sampling settings
and seed, hence the same TeacherCache (it is a pure function of those, see teacher_cache.py). The first job
writes it under `<store>/<key>.pt`; the others load it. The key hashes everything the cache depends on: the
settings, every prompt's token ids (and dataset outputs), the teacher's weights (a per-tensor checksum), the
device type and the store format. Files are written to a temp file in the same directory and renamed, so a
killed job leaves no half-written entry; an unreadable entry (damaged, or missing a field) is reported and rebuilt.
While data is made in this process, the batches done so far are kept in `<key>.partial.pt` with the sampling
generator's state (`save_partial`), so a killed job's rerun goes on from the next batch and makes the same data
an uninterrupted build makes; the complete entry replaces it.
Entries get the umask's mode (0644 under umask 022), so other users of a shared store can read them; a store
this process cannot write to (read-only, another user's) is read from, and never aborts the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger(__name__)

FORMAT = 1  # bump when TeacherCache's contents or their computation change
STORE_DIRNAME = "teacher_data"
STALE_TMP_S = 6 * 3600
STORE_ENV = "DISTILLSPEC_TEACHER_DATA"
ENTRY_FIELDS = ("tokens", "topk_idx", "topk_logp", "tail_logp")  # teacher_cache.CachedCompletion's fields


def default_store_dir() -> Path:
    """`$DISTILLSPEC_TEACHER_DATA` if set, else `<distillspec cache root>/teacher_data` (root:
    `$DISTILLSPEC_CACHE` or `~/.cache/distillspec`)."""
    from distillspec.models.offline import cache_root

    env = os.environ.get(STORE_ENV)
    return Path(env).expanduser() if env else cache_root() / STORE_DIRNAME


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """A checksum of a model's weights: each tensor's name, shape, dtype, sum and sum of squares (float64)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        x = t.detach()
        stats = torch.stack([x.double().sum(), x.double().square().sum()]).cpu().tolist() if x.numel() else []
        h.update(f"{name}|{tuple(x.shape)}|{x.dtype}|{stats!r};".encode())
    return h.hexdigest()


def cache_key(settings: dict, items: Sequence, teacher_fingerprint: str, device: torch.device) -> str:
    """sha256 over the cache's settings, the prompts' ids (and dataset outputs), teacher weights and device."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "device": torch.device(device).type, "teacher": teacher_fingerprint,
                         **settings}, sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([list(it.input_ids), None if it.target_ids is None else list(it.target_ids)]).encode())
    return h.hexdigest()[:32]


def _check_entries(entries) -> None:
    """ValueError unless `entries` is {int: {tokens (T,), topk_idx (T, k), topk_logp (T, k), tail_logp (T,)}}."""
    if not isinstance(entries, dict):
        raise ValueError(f"entries are a {type(entries).__name__}, not a dict")
    for i, e in entries.items():
        if not isinstance(i, int) or not isinstance(e, dict) or set(e) != set(ENTRY_FIELDS):
            fields = sorted(e) if isinstance(e, dict) else type(e).__name__
            raise ValueError(f"entry {i!r} has fields {fields}, expected {list(ENTRY_FIELDS)}")
        if not all(isinstance(e[f], torch.Tensor) for f in ENTRY_FIELDS):
            raise ValueError(f"entry {i!r} holds non-tensor fields")
        t = e["tokens"].shape
        if (len(t) != 1 or e["topk_idx"].dim() != 2 or e["topk_idx"].shape != e["topk_logp"].shape
                or e["topk_idx"].shape[0] != t[0] or e["tail_logp"].shape != t):
            raise ValueError(f"entry {i!r} has inconsistent shapes "
                             f"{ {f: tuple(e[f].shape) for f in ENTRY_FIELDS} }")


def load(path: Path) -> dict | None:
    """The stored entries {item index: {tokens, topk_idx, topk_logp, tail_logp}}, or None when the file is
    missing; a damaged file (unreadable, or entries missing a field) is reported, removed where the store is
    writable, and treated as missing."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"unexpected contents (format {data.get('format') if isinstance(data, dict) else '?'})")
        _check_entries(data.get("entries"))
        return data["entries"]
    except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt
        log.warning("teacher data store entry %s is unreadable (%s); rebuilding it", path, err)
        try:
            path.unlink(missing_ok=True)
        except OSError as unlink_err:  # a read-only store, or another user's: the rebuilt data stays in memory
            log.warning("could not remove the unreadable entry %s (%s); the rebuilt teacher data is used from "
                        "memory", path, unlink_err.strerror or unlink_err)
        return None


def save(path: Path, entries: dict, **extra) -> None:
    """Write entries atomically (temp file in the same directory, fsync, rename); an unwritable store is
    reported and skipped (the run goes on with its in-memory cache). The entry gets the umask's mode."""
    from distillspec.models.cache_files import file_mode

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(".*.tmp-*"):  # left by killed writers (a live writer's is minutes old)
            if time.time() - stale.stat().st_mtime > STALE_TMP_S:
                stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save({"format": FORMAT, "entries": entries, **extra}, fh)
                fh.flush()
                os.fsync(fh.fileno())
                os.fchmod(fh.fileno(), file_mode())  # mkstemp makes it 0600: others sharing the store read it
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        log.warning("could not store teacher data at %s (%s); continuing without the store", path, err)


def partial_path(path: Path) -> Path:
    """Where the batches made so far of the entry at `path` are kept while it is built."""
    return path.with_name(f"{path.stem}.partial.pt")


def save_partial(path: Path, entries: dict, generator_state: torch.Tensor) -> None:
    """Keep the entries made so far and the sampling generator's state after them (atomically, as `save`)."""
    save(path, entries, generator_state=generator_state)


def load_partial(path: Path) -> tuple[dict, torch.Tensor] | None:
    """(entries, generator state) of a build a killed job left at `path`, or None (missing or unreadable)."""
    entries = load(path)
    if entries is None:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True).get("generator_state")
    except Exception:  # noqa: BLE001 - load() read it a moment ago; treat any failure as no partial build
        return None
    return (entries, state) if isinstance(state, torch.Tensor) else None


def drop_partial(path: Path) -> None:
    """Remove the batches kept while the entry at `path` was built, once the entry is complete (a store this
    process cannot write holds none of its own: nothing to remove)."""
    try:
        partial_path(path).unlink(missing_ok=True)
    except OSError:
        pass

