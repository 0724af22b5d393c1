"""The warm draft's build process: its waiter reports progress, and the build dies with its parent.
A fake build command stands in for the ~8 min training run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distillspec.models import warm

# Writes a model into <work>/draft after `delay` seconds, as the real build's run.py would.
FAKE_BUILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    work, delay, pid_file = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(delay)
    (work / "draft").mkdir(parents=True, exist_ok=True)
    (work / "draft" / "config.json").write_text("{}")
    (work / "draft" / "model.safetensors").write_bytes(b"x")
""")


def fake_command(delay: float, pid_file: Path):
    return lambda work: [sys.executable, "-c", FAKE_BUILD, str(work), str(delay), str(pid_file)]


def test_the_build_logs_its_progress(tmp_path, monkeypatch, caplog):
    """The parent said nothing for the whole build (12 min); it logs the elapsed time and the log path."""
    monkeypatch.setattr(warm, "PROGRESS_S", 0.2)
    monkeypatch.setattr(warm, "build_command", fake_command(1.0, tmp_path / "child.pid"))
    with caplog.at_level("INFO", logger="distillspec.models.warm"):
        out = warm.ensure_warm_draft(tmp_path / "cache")
    assert (out / "config.json").is_file() and (out / warm.BUILD_RECORD).is_file()
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("still building")]
    assert progress and all("s so far" in m and "run.log" in m for m in progress)


def _dead(pid: int) -> bool:
    """Gone, or a zombie (reparented to an init that has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_killed_parent_takes_the_build_with_it(tmp_path):
    """A parent killed with SIGKILL left the build child running (it trained on for minutes, holding no lock)."""
    pid_file = tmp_path / "child.pid"
    parent_code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_warm_build import fake_command
        from distillspec.models import warm
        warm.build_command = fake_command(60.0, Path({str(pid_file)!r}))
        warm.ensure_warm_draft(Path({str(tmp_path / "cache")!r}))
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    child = None
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent exited before starting the build"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert not _dead(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while not _dead(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _dead(child), "the build outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and not _dead(child):
            os.kill(child, signal.SIGKILL)


def test_an_interrupted_parent_stops_the_build(tmp_path, monkeypatch):
    """An exception in the waiting parent (e.g. KeyboardInterrupt) kills the build before it propagates."""
    pid_file = tmp_path / "child.pid"
    monkeypatch.setattr(warm, "PROGRESS_S", 0.1)
    monkeypatch.setattr(warm, "build_command", fake_command(60.0, pid_file))

    def interrupt(*args):
        if pid_file.is_file() and pid_file.read_text():
            raise KeyboardInterrupt

    monkeypatch.setattr(warm.log, "info", lambda msg, *args: interrupt() if msg.startswith("still") else None)
    with pytest.raises(KeyboardInterrupt):
        warm.ensure_warm_draft(tmp_path / "cache")
    assert _dead(int(pid_file.read_text()))
