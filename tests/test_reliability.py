"""Reliability: a build or a training run killed at any moment, a full disk, a corrupted cache, two builds
on one cache, changed inputs. Each test fails if the protection it names is removed.

Cache-only tests use the fake teacher and source of ``fakes``; kills are real SIGKILLs of real
processes (the random cache-build kills go through ``attnfd cache build``, see ``tests/chaos.py``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnfd_pipeline.cache import CacheError, build_cache, verify_cache
from attnfd_pipeline.cache.writer import shard_file
from attnfd_pipeline.engine.checkpoint import load_checkpoint
from attnfd_pipeline.engine.train import read_log
import chaos
from fakes import TESTS, FakeSource, FakeTeacher, cache_cli, fake_cfg, share_teacher, with_overrides

runner = CliRunner()


def full_tree(d: Path) -> dict[str, bytes]:
    """Every file of a cache directory, temp files and locks included."""
    return chaos.tree(Path(d))


def debris(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.name.endswith((".partial", ".tmp")))


def parts(d: Path) -> list[str]:
    m = Path(d) / "manifest"
    return sorted(p.name for p in m.glob("part-*")) if m.is_dir() else []


# ---------------------------------------------------------------------------------------------
# kill during `cache build`


@pytest.fixture(scope="module")
def chaos_fixture(tmp_path_factory):
    """Tiny dataset + deterministic untrained teacher bundle + an uninterrupted reference build."""
    return chaos.make_fixture(tmp_path_factory.mktemp("chaos"), n_images=12)


@pytest.mark.slow
def test_cache_build_killed_at_random_moments_resumes_bitwise(chaos_fixture, tmp_path):
    """3 random SIGKILLs of `attnfd cache build` (CI's share of `make chaos`): each rerun resumes, the
    final store equals the uninterrupted one byte for byte, verify passes, nothing committed is lost.
    Set ATTNFD_CHAOS_SEED to replay a failure."""
    seed = int(os.environ.get("ATTNFD_CHAOS_SEED", random.SystemRandom().randrange(2**31)))
    tally = chaos.run(chaos_fixture, tmp_path, kills=3, seed=seed, mode="inprocess")
    assert tally.line() == "3 kills, 3 resumed, 0 corrupt, 0 lost", (f"ATTNFD_CHAOS_SEED={seed}", tally.problems)


_KILL_SITES = {
    # SIGKILL itself half-way through writing shard 1's D chunk (after shard 1's B and E landed)
    "chunk": '''
import zarr.storage._local as L
_orig = L._put
def _put(path, value, exclusive=False):
    if "/D/c/1/" in str(path):
        data = memoryview(value.as_buffer_like()).cast("B")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".killed.partial"), "wb") as f:
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _orig(path, value, exclusive)
L._put = _put
''',
    # … half-way through writing shard 1's manifest part (all its data landed)
    "part": '''
import attnfd_pipeline.cache.manifest as M
_orig = M.atomic_write_bytes
def _write(path, data):
    if path.name == "part-00001.parquet":
        with open(path.with_name(f".{path.name}.killed.tmp"), "wb") as f:
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _orig(path, data)
M.atomic_write_bytes = _write
''',
    # … half-way through writing cache.json (a fresh directory: arrays created, nothing committed)
    "cache.json": '''
import attnfd_pipeline.cache.writer as W
def _write(path, obj):
    with open(path.with_name(f".{path.name}.killed.tmp"), "w") as f:
        f.write(json.dumps(obj)[:100]); f.flush(); os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
W.atomic_write_json = _write
''',
}


@pytest.mark.slow
@pytest.mark.parametrize("site", sorted(_KILL_SITES))
def test_cache_build_killed_while_writing_resumes_bitwise(site, tmp_path, built):
    """A kill in the middle of a chunk, manifest-part or cache.json write leaves a temp file and no commit
    record; the rerun removes the debris (remove_debris), rewrites what was not committed and ends
    bitwise identical — the whole directory, not only the arrays."""
    _, _, _, ref = built
    script = (f"import json, os, signal, sys; sys.path.insert(0, {str(TESTS)!r})\n" + _KILL_SITES[site] +
              "from fakes import FakeTeacher, FakeSource, fake_cfg\n"
              "from attnfd_pipeline.cache import build_cache\n"
              f"build_cache(fake_cfg({str(tmp_path)!r}), FakeTeacher(), FakeSource(), progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    d = tmp_path / ref.path.name
    left = debris(d)
    assert any("killed" in p for p in left), left  # the kill did land mid-write
    expect_parts = {"chunk": ["part-00000.parquet"], "part": ["part-00000.parquet"], "cache.json": []}[site]
    assert parts(d) == expect_parts  # shard 1 (and later) not committed
    r = build_cache(fake_cfg(tmp_path), FakeTeacher(), FakeSource(), progress=False)
    assert r.shards_written == 3 - len(expect_parts)
    assert debris(d) == []
    assert full_tree(d) == full_tree(ref.path)
    assert verify_cache(d, source=FakeSource()).ok


def _train_script(argv: list[str], *, kill_at_save: int | None = None) -> str:
    """A child running the CLI on the test's torch thread count; with ``kill_at_save=n`` it SIGKILLs itself
    half-way through writing its n-th ``last.pt`` (inside the temp file of ``utils.write_temp``)."""
    hook = ""
    if kill_at_save is not None:
        hook = f'''
import io, os, signal
from pathlib import Path
import attnfd_pipeline.engine.checkpoint as C
_real_save, _real_temp, _n, _armed = torch.save, C.write_temp, [0], [False]
def _save(obj, f, *a, **k):
    if _armed[0]:
        buf = io.BytesIO(); _real_save(obj, buf, *a, **k); data = buf.getvalue()
        f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_save(obj, f, *a, **k)
def _temp(path, write):
    if Path(path).name == "last.pt":
        _n[0] += 1
        _armed[0] = _n[0] == {kill_at_save}
    return _real_temp(path, write)
torch.save, C.write_temp = _save, _temp
'''
    return (f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n{hook}\n"
            f"from stages.cli import app\napp({argv!r})\n")


def _write_cfg(cfg, path: Path) -> Path:
    from attnfd_pipeline.config import dump_toml

    path.write_text(dump_toml(cfg))
    return path


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "eval_seconds")} for r in read_log(path)]


@pytest.mark.slow
def test_teacher_killed_at_random_moment_resumes_to_identical_weights(tiny_data, tmp_path):
    """SIGKILL `attnfd teacher` at a random moment of its training, then `--resume` (here in-process):
    the bundle's weights hash, the metrics log and the final mIoU equal an uninterrupted run's."""
    from conftest import make_cfg
    from attnfd_pipeline.runs import run_teacher
    from attnfd_pipeline.teacher import load_teacher_info

    extra = ("teacher.train.epochs=2", "teacher.train.batch_size=8")
    ref_cfg = make_cfg(tiny_data, tmp_path / "ref", *extra)
    t0 = time.perf_counter()
    ref_bundle = run_teacher(ref_cfg, progress=False)
    seconds = time.perf_counter() - t0
    # the machine's load can change between the reference run and the killed one: a process that finished
    # before its kill is tried again with a shorter delay, in a fresh folder
    for attempt in range(4):
        cut_cfg = make_cfg(tiny_data, tmp_path / f"cut{attempt}", *extra)
        if _kill_teacher_after(cut_cfg, tmp_path / f"cut{attempt}.toml",
                               random.uniform(0.05, 0.6) * seconds / 2 ** attempt):
            break
    else:
        raise AssertionError("the teacher finished before every kill")
    cut_bundle = run_teacher(cut_cfg, resume=True, progress=False)
    assert load_teacher_info(cut_bundle)["sha256"] == load_teacher_info(ref_bundle)["sha256"]
    train = "train/metrics.parquet"
    assert _rows(cut_cfg.teacher_dir / train) == _rows(ref_cfg.teacher_dir / train)
    ref_res = json.loads((ref_cfg.teacher_dir / "result.json").read_text())
    cut_res = json.loads((cut_cfg.teacher_dir / "result.json").read_text())
    assert cut_res["miou"] == ref_res["miou"] and cut_res["epochs"] == 2


def _kill_teacher_after(cfg, cfg_path: Path, delay: float) -> bool:
    """Run `attnfd teacher` in a process, SIGKILL it ``delay`` s after it checked its inputs; whether the kill
    came before it finished."""
    p = _write_cfg(cfg, cfg_path)
    proc = subprocess.Popen([sys.executable, "-c", _train_script(["teacher", "--config", str(p)])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = cfg.teacher_dir / "config.resolved.toml"  # written once the inputs are checked
    try:
        deadline = time.monotonic() + 300
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    return proc.returncode == -signal.SIGKILL


def _student_cfg(tiny_pipeline, tmp_path: Path, name: str, *extra):
    cfg, _ = tiny_pipeline
    new = with_overrides(cfg, tmp_path, f'runs_root="{tmp_path / name}"', "student.train.epochs=2",
                "student.train.batch_size=8", *extra)
    share_teacher(cfg, new)
    return new


@pytest.mark.slow
def test_student_killed_while_saving_checkpoint_resumes_to_identical_weights(tiny_pipeline, tmp_path):
    """The student process SIGKILLs itself half-way through writing last.pt of epoch 2: the previous
    last.pt (epoch 1) is intact (atomic temp + rename), `--resume` ends with the same weights and
    metrics as an uninterrupted run, and the half-written temp file is removed."""
    from attnfd_pipeline.runs import run_student, student_dir

    ref_cfg = _student_cfg(tiny_pipeline, tmp_path, "ref")
    ref = run_student(ref_cfg, progress=False)
    cut_cfg = _student_cfg(tiny_pipeline, tmp_path, "cut")
    p = _write_cfg(cut_cfg, tmp_path / "cut.toml")
    proc = subprocess.run([sys.executable, "-c", _train_script(["student", "--config", str(p)], kill_at_save=2)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = student_dir(cut_cfg)
    assert [t.name for t in run_dir.glob(".last.pt.*.tmp")]  # the kill landed inside the save
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1  # "last" is the previous, complete one
    cut = run_student(cut_cfg, resume=True, progress=False)
    assert not list(run_dir.glob(".last.pt.*.tmp"))
    a = torch.load(student_dir(ref_cfg) / "last.pt", weights_only=True)["modules"]
    b = torch.load(run_dir / "last.pt", weights_only=True)["modules"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(run_dir / "metrics.parquet") == _rows(student_dir(ref_cfg) / "metrics.parquet")
    assert cut["best_miou"] == ref["best_miou"] and cut["epochs"] == 2


# ---------------------------------------------------------------------------------------------
# disk full


class DiskBudget:
    """A disk that fills up: the zarr store's file writes and the manifest writer raise
    OSError(ENOSPC) once ``budget`` bytes have been written (the write that crosses it lands partially
    in its temp file first, as on a real full disk)."""

    def __init__(self, monkeypatch, budget: int):
        import attnfd_pipeline.cache.manifest as manifest
        import zarr.storage._local as local

        self.left = budget
        atomic = local._atomic_write

        def put(path, value, exclusive=False):
            data = memoryview(value.as_buffer_like()).cast("B")
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic(path, "wb", exclusive=exclusive) as f:
                if len(data) > self.left:
                    f.write(data[: self.left])
                    self.left = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.left -= len(data)
                return f.write(data)

        write_bytes = manifest.atomic_write_bytes

        def write_part(path, data):
            if len(data) > self.left:
                self.left = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            self.left -= len(data)
            return write_bytes(path, data)

        monkeypatch.setattr(local, "_put", put)
        monkeypatch.setattr(manifest, "atomic_write_bytes", write_part)


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized as a component of a Zarr hierarchy")
def test_disk_full_clear_error_nothing_half_committed_rerun_equal(tmp_path, built, monkeypatch):
    """ENOSPC at five points of a build (early metadata, inside shards' chunk writes, inside a manifest
    part): a CacheError naming the disk and the cache path; every committed shard verifies (no part for
    data that did not fully land), no temp file is left; after "freeing space" the rerun completes
    bitwise equal to an uninterrupted build."""
    _, _, _, ref = built
    with monkeypatch.context() as m:
        probe = DiskBudget(m, 10**12)
        build_cache(fake_cfg(tmp_path / "probe"), FakeTeacher(), FakeSource(), progress=False)
        total = 10**12 - probe.left
    seen_parts = set()
    for frac in (0.02, 0.3, 0.55, 0.8, 0.97):
        root = tmp_path / f"full{frac}"
        with monkeypatch.context() as m:
            DiskBudget(m, int(total * frac))
            with pytest.raises(CacheError) as e:
                build_cache(fake_cfg(root), FakeTeacher(), FakeSource(), progress=False)
        d = root / ref.path.name
        msg = str(e.value)
        assert "disk full" in msg and os.strerror(errno.ENOSPC) in msg and str(d) in msg and "rerun" in msg
        assert debris(d) == [] and not (d / ".lock").exists()
        committed = parts(d)
        seen_parts.add(len(committed))
        if (d / "cache.json").exists():
            rep = verify_cache(d, source=FakeSource())
            assert rep.ok, rep.lines()  # a committed part always vouches for complete, correct data
        r = build_cache(fake_cfg(root), FakeTeacher(), FakeSource(), progress=False)
        assert r.shards_written == 3 - len(committed)
        assert full_tree(d) == full_tree(ref.path)
    assert len(seen_parts) >= 3  # the failures did land in different shards


def test_disk_full_through_the_cli_exits_non_zero(cache_cli_env, monkeypatch):
    cfg_path, tmp_path, _ = cache_cli_env
    DiskBudget(monkeypatch, 3000)
    r = cache_cli("build", "--config", cfg_path, "--no-progress")
    assert r.exit_code == 2 and "disk full" in r.output and str(tmp_path / "cache") in r.output
    assert "Traceback" not in r.output


# ---------------------------------------------------------------------------------------------
# corruption


def test_verify_names_every_corrupt_sample_and_exits_non_zero(cache_cli_env):
    """A flipped byte in a chunk, a truncated shard, a NaN sample that has a manifest row and a deleted
    manifest part, all in one cache: `attnfd cache verify` names each (image id, seed, target) and exits 1."""
    import zarr

    cfg_path, tmp_path, _ = cache_cli_env
    assert cache_cli("build", "--config", cfg_path, "--no-progress").exit_code == 0
    (d,) = (tmp_path / "cache").iterdir()
    f = shard_file(d, "D", 0)  # first chunk of the shard = image 0, seed 0
    data = bytearray(f.read_bytes())
    data[5] ^= 0xFF
    f.write_bytes(bytes(data))
    f = shard_file(d, "B", 1)  # images 2, 3
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    arr = zarr.open_array(d / "features.zarr" / "E", mode="r+")
    arr[1, 1] = np.full(arr.shape[2:], np.nan, np.float16)  # image 1 seed 1: NaN data, manifest row kept
    (d / "manifest" / "part-00002.parquet").unlink()  # image 4: data without a commit record
    r = cache_cli("verify", "--config", cfg_path)
    assert r.exit_code == 1, r.output
    out = r.output
    for image, seed, target in [(0, 0, "D"), (1, 1, "E"), (2, 0, "B"), (2, 1, "B"), (3, 0, "B"), (3, 1, "B")]:
        assert f"image 'img_{image:03d}' (index {image}), aug seed {seed}, target '{target}'" in out, out
    assert "image 'img_000' (index 0), aug seed 1" not in out  # the neighbours are fine
    assert "missing: all NaN" in out and "unreadable chunk" in out
    assert "no manifest part for images 'img_004' × aug seeds 0..1, targets B, E, D" in out
    assert cache_cli("verify", "--config", cfg_path, "--allow-incomplete").exit_code == 1  # still bad


@pytest.mark.slow
def test_student_refuses_a_sample_whose_checksum_fails(tiny_pipeline, tmp_path):
    """Stage 2 never trains on garbage: a cached sample whose bytes no longer match the manifest checksum
    stops `attnfd student` with a message naming the image, seed and target (exit 2)."""
    import zarr

    from attnfd_pipeline.data.loaders import EpochSampler
    from attnfd_pipeline.runs import student_dir
    from stages.cli import app

    cfg, _ = tiny_pipeline
    new = _student_cfg(tiny_pipeline, tmp_path, "runs", f'cache.root="{tmp_path / "cache"}"',
                       "student.train.epochs=1")
    (src,) = [p for p in Path(cfg.cache.root).iterdir() if (p / "cache.json").is_file()]
    d = tmp_path / "cache" / src.name
    shutil.copytree(src, d)
    sampler = EpochSampler(10, seed=new.student.train.seed)
    first = next(iter(sampler))[1]  # first image the student reads
    arr = zarr.open_array(d / "features.zarr" / "D", mode="r+")
    arr[first] = arr[first] * np.float16(1.5)  # valid crc32c, wrong values: only the manifest checksum sees it
    r = runner.invoke(app, ["student", "--config", str(_write_cfg(new, tmp_path / "s.toml"))])
    assert r.exit_code == 2, r.output
    assert "checksum mismatch" in r.output and f"(index {first}), aug seed" in r.output and "target 'D'" in r.output
    assert f"train_{first:05d}" in r.output and "Traceback" not in r.output
    assert not (student_dir(new) / "last.pt").exists()


# ---------------------------------------------------------------------------------------------
# two builds on one cache


@pytest.mark.slow
def test_second_build_on_a_live_cache_refuses_and_writes_nothing(cache_cli_env, monkeypatch):
    """While one process builds (and holds the lock), `attnfd cache build` on the same directory refuses
    naming the owner's pid and host — at once, after --wait, and with another --world (whose shards
    would overlap) — and the directory is byte-identical before and after: no interleaved writes."""
    cfg_path, tmp_path, _ = cache_cli_env
    script = (
        "import sys; sys.path.insert(0, {tests!r})\n"
        "from fakes import FakeTeacher, FakeSource, fake_cfg\n"
        "from attnfd_pipeline.cache import build_cache\n"
        "build_cache(fake_cfg({root!r}), FakeTeacher(), FakeSource(slow_from=2), progress=False)\n"
    ).format(tests=str(TESTS), root=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        part = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((tmp_path / "cache").glob("*/manifest/part-00000.parquet"))
            if found:
                part = found[0]
                break
            time.sleep(0.05)
        assert part is not None, proc.stderr.read().decode()[-2000:]
        d = part.parent.parent
        before = full_tree(d)
        owner = f"pid {proc.pid} on host {socket.gethostname()}"
        r = cache_cli("build", "--config", cfg_path, "--no-progress")
        assert r.exit_code == 2 and owner in r.output, r.output
        t0 = time.monotonic()
        r = cache_cli("build", "--config", cfg_path, "--no-progress", "--wait", "1")
        assert r.exit_code == 2 and owner in r.output and time.monotonic() - t0 >= 1.0
        r = cache_cli("build", "--config", cfg_path, "--no-progress", "--world", "2", "--rank", "0")
        assert r.exit_code == 2 and owner in r.output and "overlap" in r.output, r.output
        assert full_tree(d) == before
        assert proc.poll() is None  # the owner was never disturbed
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


# ---------------------------------------------------------------------------------------------
# changed inputs


def _copy_dataset(tiny_data, dest: Path) -> Path:
    shutil.copytree(tiny_data, dest)
    return dest


@pytest.mark.parametrize("change, field", [
    ("teacher", "teacher_sha256"),
    ("dataset", "dataset.listing_sha256"),
    ("crop", "augment.crop_size"),
    ("K", "K: cache has 2, config gives 3"),
    ("augmentation", "augment.scale_max"),
])
@pytest.mark.slow
def test_changed_input_is_a_new_fingerprint_and_the_student_names_it(change, field, tiny_pipeline, tiny_data,
                                                                      tmp_path):
    """A different teacher checkpoint, dataset file, crop size, K or augmentation recipe fingerprints to
    another cache: the old one is never reused, and `attnfd student` names the field that differs,
    exit 2, before it writes anything."""
    from attnfd_pipeline.runs import student_dir
    from stages.cli import app

    cfg, _ = tiny_pipeline
    (src,) = [p for p in Path(cfg.cache.root).iterdir() if (p / "cache.json").is_file()]
    shutil.copytree(src, tmp_path / "cache" / src.name)
    extra = {"crop": ["augment.crop_size=[40, 40]"], "K": ["cache.K=3"], "augmentation": ["augment.scale_max=1.5"],
             "teacher": [], "dataset": []}[change]
    if change == "dataset":  # one image file changed on disk (size), same ids
        root = _copy_dataset(tiny_data, tmp_path / "data")
        img = root / "JPEGImages" / "train_00004.jpg"
        img.write_bytes(img.read_bytes() + b"\0" * 16)
        extra = [f'data.root="{root}"']
    new = _student_cfg(tiny_pipeline, tmp_path, "runs", f'cache.root="{tmp_path / "cache"}"', *extra)
    if change == "teacher":  # a retrained teacher: its bundle records other weights
        side = new.teacher_dir / "teacher_bundle.json"
        info = json.loads(side.read_text())
        info["sha256"] = "0" * 64
        side.write_text(json.dumps(info))
    r = runner.invoke(app, ["student", "--config", str(_write_cfg(new, tmp_path / "s.toml"))])
    assert r.exit_code == 2, r.output
    assert "no cache" in r.output and "closest existing cache" in r.output and field in r.output, r.output
    assert not student_dir(new).exists()
