"""Kill-and-resume harness for ``attnfd cache build`` (``make chaos``; tests/test_reliability.py runs 3 kill points).

A test harness, not part of the library: it lives beside the tests and runs as a script.

A trial runs the real command line (``python -m stages.cli cache build``) on a tiny generated dataset with a
deterministic untrained teacher bundle, SIGKILLs it at a random moment after it took the build lock (one
to ``max_kills_per_trial`` times in a row, each rerun resuming the previous one), then lets a last rerun
finish. The trial is then checked against an uninterrupted build of the same inputs:

- **resumed**: the last rerun completed, wrote only the shards that were not committed at the last kill;
- **corrupt**: the cache directory is not bitwise identical to the uninterrupted one (every file,
  debris included), or ``verify_cache`` is not OK;
- **lost**: a manifest part committed before a kill was later rewritten or removed (its inode or bytes
  changed), or samples are missing at the end.

``python tests/chaos.py --kills 20`` prints ``20 kills, 20 resumed, 0 corrupt, 0 lost`` when all is well.
All builds run single-threaded (``OMP_NUM_THREADS=1`` in the children, ``torch.set_num_threads(1)`` here) so
the teacher's float32 outputs, and so the stored float16 bytes, are identical between processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Fixture:
    """A tiny dataset, an untrained teacher bundle, a config file and an uninterrupted reference cache."""

    root: Path
    config: Path
    cfg: object
    reference: Path  # the uninterrupted build's cache directory
    build_seconds: float  # how long the uninterrupted build_cache call took (kills are drawn in [0, this])

    @property
    def fingerprint_dir(self) -> str:
        return self.reference.name


@dataclass
class Tally:
    kills: int = 0
    resumed: int = 0
    corrupt: int = 0
    lost: int = 0
    problems: list[str] = field(default_factory=list)
    mid_write: int = 0  # kills that left temp files behind (killed while writing a chunk, part or cache.json)
    committed_at_kill: list[int] = field(default_factory=list)  # shards committed when each kill landed

    def line(self) -> str:
        return f"{self.kills} kills, {self.resumed} resumed, {self.corrupt} corrupt, {self.lost} lost"


@contextlib.contextmanager
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _cfg_for(fx_or_cfg, cache_root: Path):
    import dataclasses

    cfg = fx_or_cfg.cfg if isinstance(fx_or_cfg, Fixture) else fx_or_cfg
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, root=str(cache_root)))


def build_in_process(cfg, cache_root: Path):
    """``build_cache`` for ``cfg`` into ``cache_root`` with the bundle and dataset of ``cfg`` (one thread)."""
    from attnfd_pipeline.cache import build_cache
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.teacher import bundle_path, load_teacher

    cfg = _cfg_for(cfg, cache_root)
    with single_thread():
        teacher = load_teacher(bundle_path(cfg), "cpu")
        return build_cache(cfg, teacher, ImageSource.from_config(cfg, cfg.data.train_split), progress=False)


def make_fixture(workdir: str | Path, *, n_images: int = 16, seed: int = 0) -> Fixture:
    """Generate the dataset, write the config and an untrained (seeded) teacher bundle, build the reference."""
    from attnfd_pipeline.config import dump_toml, load_config
    from attnfd_pipeline.data.demo import generate_demo
    from attnfd_pipeline.teacher import build_teacher_model, bundle_path, save_bundle

    root = Path(workdir)
    data = root / "data"
    generate_demo(data, seed=seed, n_train=n_images, n_val=2, min_size=40, max_size=64, workers=1)
    overrides = [
        'name="chaos"', f'runs_root="{root / "runs"}"', f'data.root="{data}"', "data.num_workers=0",
        "augment.crop_size=[48, 48]", "augment.base_size=48", 'teacher.model.name="deeplabv3plus_resnet18"',
        'teacher.train.device="cpu"', f'cache.root="{root / "reference"}"', "cache.K=2", "cache.shard_size=2",
        "cache.batch_size=4",
    ]
    cfg = load_config(None, overrides)
    config = root / "chaos.toml"
    config.write_text(dump_toml(cfg))
    nc = cfg.data.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_teacher_model(cfg, nc).eval()
    save_bundle(bundle_path(cfg), cfg, model, None, nc)
    ref = build_in_process(cfg, root / "reference")
    return Fixture(root, config, cfg, ref.path, ref.seconds)


def tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path → bytes), dot-files and temp files included; not the build's
    log.txt (timestamps and a resumed build's extra lines make it differ by design)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and str(p.relative_to(d)) != "log.txt"}


def _parts(cache_dir: Path) -> dict[str, tuple[int, bytes]]:
    m = cache_dir / "manifest"
    if not m.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in m.glob("part-*.parquet")}


def _lock_pid(lock: Path) -> int | None:
    try:
        return int(json.loads(lock.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _command(fx: Fixture, cache_root: Path) -> list[str]:
    return [sys.executable, "-m", "stages.cli", "cache", "build", "--config", str(fx.config), "--no-progress",
            "--set", f'cache.root="{cache_root}"']


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_killed(fx: Fixture, cache_root: Path, delay: float, *, timeout: float = 180.0) -> tuple[bool, float]:
    """Start a build; ``delay`` seconds after it holds the lock, SIGKILL it. Returns (killed, seconds it ran
    after taking the lock); killed is False when it finished first."""
    lock = cache_root / fx.fingerprint_dir / ".lock"
    proc = subprocess.Popen(_command(fx, cache_root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env())
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and _lock_pid(lock) != proc.pid:
            if time.monotonic() > deadline:
                raise RuntimeError("build did not take its lock in time")
            time.sleep(0.005)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < delay:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True, time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"build failed (exit {proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        return False, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


_WRITTEN = re.compile(r"shards written (\d+), skipped (\d+) of (\d+)")


def resume(fx: Fixture, cache_root: Path, mode: str) -> tuple[int, int]:
    """Rerun the build to completion: (shards written, shards total)."""
    if mode == "inprocess":
        r = build_in_process(fx.cfg, cache_root)
        return r.shards_written, r.shards_total
    out = subprocess.run(_command(fx, cache_root), capture_output=True, text=True, env=_env(), timeout=600)
    m = _WRITTEN.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"resume failed (exit {out.returncode}): {out.stderr[-2000:]}")
    return int(m.group(1)), int(m.group(3))


def trial(fx: Fixture, cache_root: Path, rng: random.Random, *, kills: int, mode: str, tally: Tally) -> None:
    """One cache directory: up to ``kills`` SIGKILLs at random moments, then a rerun to completion; checks."""
    from attnfd_pipeline.cache import CacheReader, verify_cache

    cache_dir = cache_root / fx.fingerprint_dir
    span = fx.build_seconds
    done, vouched = 0, {}  # parts committed at some kill → (inode, bytes) they must keep
    while done < kills:
        killed, ran = run_killed(fx, cache_root, rng.uniform(0.0, span))
        if not killed:  # finished before the kill: kill earlier next time
            span = max(0.05, min(span, ran) * 0.8)
            if done == 0:  # nothing killed yet in this directory: start it again from scratch
                shutil.rmtree(cache_root, ignore_errors=True)
                continue
            break
        done += 1
        vouched.update(_parts(cache_dir))
        tally.committed_at_kill.append(len(_parts(cache_dir)))
        if cache_dir.is_dir() and any(p.name.endswith((".partial", ".tmp")) for p in cache_dir.rglob("*")):
            tally.mid_write += 1
    tally.kills += done
    if done == 0:
        return
    committed = len(_parts(cache_dir))
    written, total = resume(fx, cache_root, mode)
    ok_resume = written == total - committed
    if not ok_resume:
        tally.problems.append(f"{cache_root}: resume wrote {written} shards, expected {total - committed}")
    now = _parts(cache_dir)
    changed = [n for n, v in vouched.items() if now.get(n) != v]
    if changed:
        tally.problems.append(f"{cache_root}: committed parts rewritten or lost: {changed}")
    reader = CacheReader(cache_dir)
    missing = reader.num_images * reader.K - reader.num_committed
    tally.lost += len(changed) + missing
    same = tree(cache_dir) == tree(fx.reference)
    report = verify_cache(cache_dir, replay=0)
    if not same:
        a, b = tree(cache_dir), tree(fx.reference)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        tally.problems.append(f"{cache_root}: differs from the uninterrupted build in {diff[:5]}")
    if not report.ok or not report.complete:
        tally.problems.append(f"{cache_root}: verify: {report.lines()[-1]}")
    if not same or not report.ok or not report.complete:
        tally.corrupt += 1
    if ok_resume and not changed and not missing:
        tally.resumed += done


def run(fx: Fixture, workdir: str | Path, *, kills: int, seed: int, mode: str = "subprocess",
        max_kills_per_trial: int = 1, keep: bool = False, log=None) -> Tally:
    """``kills`` SIGKILLs spread over trials of 1..``max_kills_per_trial`` kills each."""
    rng = random.Random(seed)
    tally = Tally()
    n = 0
    while tally.kills < kills:
        cache_root = Path(workdir) / f"trial{n:03d}"
        shutil.rmtree(cache_root, ignore_errors=True)
        want = min(kills - tally.kills, rng.randint(1, max_kills_per_trial))
        before = tally.line()
        trial(fx, cache_root, rng, kills=want, mode=mode, tally=tally)
        if log is not None:
            log(f"trial {n}: {before} -> {tally.line()}")
        if not keep and not tally.problems:
            shutil.rmtree(cache_root, ignore_errors=True)
        n += 1
    return tally


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="SIGKILL `attnfd cache build` at random moments, resume, compare "
                                             "bitwise with an uninterrupted build.")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs in total (default 20)")
    ap.add_argument("--max-kills-per-trial", type=int, default=2,
                    help="kill a resumed build again up to this many times before letting it finish")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("--images", type=int, default=16, help="images in the generated dataset (2 per shard)")
    ap.add_argument("--resume", choices=["subprocess", "inprocess"], default="subprocess",
                    help="how the final rerun of each trial runs")
    ap.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp folder)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="attnfd-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"chaos: seed {seed}, workdir {work}", flush=True)
    fx = make_fixture(work / "fixture", n_images=args.images)
    print(f"chaos: uninterrupted build {fx.build_seconds:.2f} s ({fx.reference})", flush=True)
    tally = run(fx, work / "trials", kills=args.kills, seed=seed, mode=args.resume,
                max_kills_per_trial=args.max_kills_per_trial, log=lambda s: print(f"chaos: {s}", flush=True))
    for p in tally.problems:
        print(f"chaos: PROBLEM {p}", flush=True)
    print(f"chaos: shards committed when the kills landed: {tally.committed_at_kill}; {tally.mid_write} kill(s) "
          f"landed mid-write (temp files left, removed by the resume)", flush=True)
    print(tally.line(), flush=True)
    if args.workdir is None and not tally.problems:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if tally.resumed == tally.kills and tally.corrupt == 0 and tally.lost == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
