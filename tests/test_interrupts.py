"""Ctrl-C and SIGKILL during checkpoint saves never leave a run that --resume refuses.

The kill loop starts a process that saves a checkpoint back to back (``engine.checkpoint.save_hashed``, as
``fit`` does after every epoch) and delivers SIGINT or SIGKILL at delays spread over several saves; after each
kill the checkpoint must load hash-checked, whole. The CLI test interrupts a real ``attnfd student`` run:
exit code 130, the epoch / step it stopped at and the command that resumes it, then that command finishes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnfd_pipeline.config import dump_toml
from attnfd_pipeline.engine.checkpoint import FORMAT, load_checkpoint, save_hashed

KILLS = 24


def _state(n: int) -> dict:
    return {"format": FORMAT, "n": n, "w": torch.full((1 << 19,), float(n))}  # 2 MB: a save takes a few ms


def _saver(path: Path) -> None:
    """The child: save versions 1, 2, … until killed, saying "ready" after its first save; a Ctrl-C exits 130
    once the save under way is done."""
    torch.set_num_threads(1)
    try:
        n = first = load_checkpoint(path)["n"]
        while True:
            n += 1
            save_hashed(_state(n), path)
            if n == first + 1:
                print("ready", flush=True)
    except KeyboardInterrupt:
        os._exit(130)
    finally:
        os._exit(1)


def _reap(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """The child's exit code; a child still running after ``timeout`` is killed and the test fails."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the saver {proc.pid} ignored its signal for {timeout:.0f} s") from None


def _start_saver(path: Path) -> subprocess.Popen:
    """A fresh interpreter (not a fork of this one: a fork of a process with threads — zarr's event loop,
    dask, torch's pools — can deadlock on a lock one of them held), SIGINT at its default so Python installs
    its Ctrl-C handler even when the suite runs from a background shell (which ignores SIGINT)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, __file__, str(path)], env=env, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "ready", f"the saver {proc.pid} did not start"
    return proc


def _kill_loop(path: Path, kills: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(3):
        save_hashed(_state(0), path)
    period = (time.perf_counter() - t0) / 3
    tally = {"kills": 0, "resumed": 0, "refused": 0, "sigint_exit_130": 0}
    for i in range(kills):
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGKILL
        proc = _start_saver(path)
        time.sleep(period * (0.3 + 4.0 * i / kills))  # from inside the next save to several saves in
        proc.send_signal(sig)
        code = _reap(proc)
        tally["kills"] += 1
        if sig == signal.SIGINT and code == 130:
            tally["sigint_exit_130"] += 1
        try:
            state = load_checkpoint(path)
        except ValueError:
            tally["refused"] += 1
            continue
        whole = bool((state["w"] == float(state["n"])).all())
        tally["resumed" if whole else "refused"] += 1
    return tally


@pytest.mark.slow
def test_kills_during_checkpoint_saves_never_leave_a_refused_checkpoint(tmp_path):
    tally = _kill_loop(tmp_path / "last.pt", KILLS)
    print(f"{tally['kills']} kills, {tally['resumed']} resumed, {tally['refused']} refused")
    assert tally == {"kills": KILLS, "resumed": KILLS, "refused": 0, "sigint_exit_130": KILLS // 2}
    assert load_checkpoint(tmp_path / "last.pt")["n"] > 3  # the children did save


def test_the_old_single_hash_sidecar_layout_still_loads(tmp_path):
    import hashlib

    path = tmp_path / "last.pt"
    torch.save(_state(7), path)
    path.with_name("last.pt.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  last.pt\n")
    assert load_checkpoint(path)["n"] == 7
    save_hashed(_state(8), path)  # and a new save over it keeps one line
    assert load_checkpoint(path)["n"] == 8 and len(path.with_name("last.pt.sha256").read_text().splitlines()) == 1


@pytest.mark.slow
def test_ctrl_c_during_a_student_run_says_where_and_how_to_resume(tiny_cfg, tmp_path):
    from attnfd_pipeline.config import load_config
    from attnfd_pipeline.runs import student_dir

    p = tmp_path / "tiny.toml"
    p.write_text(dump_toml(tiny_cfg))
    args = ["--alpha", "0", "--set", "student.train.epochs=2"]
    last = student_dir(load_config(p, ["student.alpha=0", "student.train.epochs=2"])) / "last.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # SIGINT at its default in the child, so Python installs its Ctrl-C handler there even when this test
    # run was started in the background (which ignores SIGINT, and an ignored signal is inherited)
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "student", "-c", str(p), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and re.search(r"^interrupted at epoch [12]/2, step [2-4]; resume with ", err, re.M), err
    resume = err.split("resume with ", 1)[1].split()
    assert resume[:4] == ["attnfd", "student", "-c", str(p)] and resume[-1] == "--resume", err
    assert "student.train.epochs=2" in resume and "student.alpha=0.0" in resume
    assert load_checkpoint(last)["epoch"] == 1
    r = subprocess.run([sys.executable, "-m", "stages.cli", "student", "-c", str(p), *args, "--resume"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "(2 epochs" in r.stdout, r.stdout + r.stderr


if __name__ == "__main__":  # the kill loop's child (``_start_saver``)
    _saver(Path(sys.argv[1]))
