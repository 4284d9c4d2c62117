"""`attnfd cache …`: Stage 1b — plan, build, describe and verify the teacher-feature cache.

Command bodies only compose library calls (``attnfd_pipeline.cache``); the three loaders below are
module-level so tests can swap in a fake teacher and dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import DEFAULT_CONFIG, ConfigOpt, QuietOpt, SetOpt, VerboseOpt, errors, load, logs, show_paths
from attnfd_pipeline.errors import UserError

app = typer.Typer(help="Stage 1b: the teacher-feature cache (plan, build, info, verify).", no_args_is_help=True,
                  pretty_exceptions_enable=False)

TeacherOpt = Annotated[Optional[Path], typer.Option(
    "--teacher", help="Teacher bundle (default: <runs_root>/<name>/teacher/teacher_bundle.pt).")]
PathOpt = Annotated[Optional[str], typer.Option(
    "--path", help="Cache directory or fsspec URL, e.g. s3://bucket/cache/<fingerprint> (default: the one the "
                   "config, teacher and dataset fingerprint to).")]


# -- loaders, imported lazily so `--help` starts fast (tests swap them for fakes) ---------------------
def load_teacher(path: Path, device: str):
    from attnfd_pipeline.teacher import load_teacher as _load

    return _load(path, device)


def load_teacher_info(path: Path) -> dict:
    from attnfd_pipeline.teacher import load_teacher_info as _info

    return _info(path)


def make_source(cfg):
    from attnfd_pipeline.data.source import ImageSource

    return ImageSource.from_config(cfg, split=cfg.data.train_split)


def _teacher_path(cfg, teacher: Path | None) -> Path:
    if teacher is not None:
        return teacher
    from attnfd_pipeline.teacher import bundle_path

    return bundle_path(cfg)


def _device(cfg, device: str | None):
    from attnfd_pipeline.utils import resolve_device

    return resolve_device(device or cfg.teacher.train.device)


def _locate(cfg, teacher: Path | None, path: str | None):
    """A cache location: ``--path`` as given (a directory or an fsspec URL), else the fingerprinted one."""
    from attnfd_pipeline.cache import find_cache

    if path is not None:
        return path
    info = load_teacher_info(_teacher_path(cfg, teacher))
    return find_cache(cfg, info, make_source(cfg))


# -- commands ------------------------------------------------------------------------------------
def positive(value: float | None) -> float | None:
    """A rate or size option must be > 0 (typer's ``min`` admits the bound itself)."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value:g} is not > 0")
    return value


@app.command("plan")
def plan_cmd(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, teacher: TeacherOpt = None,
             device: Annotated[Optional[str], typer.Option(help="Teacher device (default: teacher.train.device).")] = None,
             images: Annotated[Optional[int], typer.Option(
                 "--images", min=1, help="Training images (when the dataset is not on disk): plans from the model "
                                         "config alone, without a teacher bundle.")] = None,
             teacher_images_per_s: Annotated[Optional[float], typer.Option(
                 "--teacher-images-per-s", callback=positive,
                 help="Assumed teacher throughput, for the build time.")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print the per-encoding table as JSON.")] = False):
    """Before writing anything: samples, bytes per sample per target, estimated size, free disk, time.
    With a teacher bundle and the dataset: compression and time measured on a few real teacher outputs
    (exit 2 if it does not fit). Without either (or with --images): every encoding side by side, shapes
    from the model config, compression factors from the storage bench."""
    from attnfd_pipeline.cache import plan_cache
    from attnfd_pipeline.cache.plan import encoding_lines, encoding_table

    cfg = load(config, set_)
    with errors():
        t = None
        if images is None and not as_json:
            try:
                t = load_teacher(_teacher_path(cfg, teacher), _device(cfg, device))
            except FileNotFoundError as e:  # no teacher yet: the plan from the model config
                typer.echo(f"{e}: planning from the model config")
        if t is None:
            n = images if images is not None else _count_images(cfg)
            table = encoding_table(cfg, n, teacher_images_per_s=teacher_images_per_s)
            typer.echo(json.dumps(table, indent=2) if as_json else "\n".join(encoding_lines(table)))
            return
        source = make_source(cfg)
        plan = plan_cache(cfg, source, teacher=t, check=False)
        typer.echo("\n".join(plan.lines()))
        typer.echo("\n".join(encoding_lines(encoding_table(cfg, len(source), teacher_images_per_s=teacher_images_per_s))))
        plan.check()


def _count_images(cfg) -> int:
    try:
        return len(make_source(cfg))
    except Exception as e:  # noqa: BLE001 - a dataset not on disk: say how to plan without it
        raise UserError(f"{cfg.data.root}: cannot list the {cfg.data.train_split!r} split ({e}); pass --images N "
                         f"to plan without the dataset") from None


@app.command("build")
def build_cmd(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, teacher: TeacherOpt = None,
              device: Annotated[Optional[str], typer.Option(help="Teacher device (default: teacher.train.device).")] = None,
              rank: Annotated[int, typer.Option(min=0, help="This writer's rank: it owns shards rank, rank+world, …")] = 0,
              world: Annotated[int, typer.Option(min=1, help="Number of writers (with --scheduler: default one per "
                                                      "dask worker).")] = 1,
              wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for another build's lock.")] = 0.0,
              progress: Annotated[bool, typer.Option(help="Show the progress line.")] = True,
              scheduler: Annotated[Optional[str], typer.Option(help="Address of a dask scheduler: one writer task "
                                                                    "per rank, the teacher loaded in the workers.")] = None,
              workers: Annotated[int, typer.Option(min=0, help="Writers on a dask LocalCluster of this many worker "
                                                        "processes (0 = no dask).")] = 0,
              gpus_per_writer: Annotated[int, typer.Option(min=0, help="GPU resource each dask writer task claims "
                                                                "(workers started with --resources GPU=1).")] = 0,
              verbose: VerboseOpt = False, quiet: QuietOpt = False):
    """Build (or resume) the cache: plan first (refuses if it does not fit), then commit every shard
    this writer owns that is not committed yet. Many writers: under torchrun (one per rank), on dask
    (--scheduler ADDRESS or --workers N), or by hand (--rank/--world in N processes)."""
    logs(verbose, quiet)
    cfg = load(config, set_)
    show_paths(cfg)
    from attnfd_pipeline.engine import distributed

    env_world = distributed.env_ranks()[1]
    if scheduler or workers > 0:
        if env_world > 1 or rank != 0:
            _usage("--scheduler/--workers run every writer as a dask task: drop --rank and do not launch "
                   "under torchrun")
        _build_dask(cfg, teacher, device, world, wait, scheduler, workers, gpus_per_writer)
    elif env_world > 1:
        if rank != 0 or world != 1:
            _usage("under torchrun each rank is one writer (RANK/WORLD_SIZE from the environment): drop "
                   "--rank/--world")
        _build_torchrun(cfg, teacher, device, wait, progress)
    else:
        _build_one(cfg, teacher, device, rank, world, wait, progress)


def _usage(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _build_one(cfg, teacher, device, rank, world, wait, progress) -> None:
    from attnfd_pipeline.cache import build_cache
    from attnfd_pipeline.cache.plan import plan_build

    with errors():
        source = make_source(cfg)
        t = load_teacher(_teacher_path(cfg, teacher), _device(cfg, device))
        plan = plan_build(cfg, t, source)
        typer.echo("\n".join(plan.lines()))
        plan.check()
        r = build_cache(cfg, t, source, rank=rank, world=world, progress=progress, lock_wait=wait, record=True)
    _report(r)


def _build_torchrun(cfg, teacher, device, wait, progress) -> None:
    from attnfd_pipeline.cache.distributed import build_cache_torchrun
    from attnfd_pipeline.engine import distributed

    with errors(), distributed.launched():
        # gloo whatever the device: writers only exchange small objects (metadata ready, results)
        ctx = distributed.setup(device or cfg.teacher.train.device, backend="gloo")
        source = make_source(cfg)
        t = load_teacher(_teacher_path(cfg, teacher), ctx.device)
        r = build_cache_torchrun(cfg, t, source, progress=progress and ctx.is_main, lock_wait=wait, plan=True,
                                 record=True)
    if ctx.is_main:
        typer.echo("\n".join(r.plan_lines))
        _report(r, f"{r.world} torchrun writers")


def _worker_teacher(path: Path, device_spec: str):
    """The teacher, loaded in a dask worker on the device ``device_spec`` resolves to there."""
    from attnfd_pipeline.utils import resolve_device

    return load_teacher(path, resolve_device(device_spec))


def _build_dask(cfg, teacher, device, world, wait, scheduler, workers, gpus_per_writer) -> None:
    import functools

    from attnfd_pipeline.cache.distributed import build_cache_dask

    path = _teacher_path(cfg, teacher)
    dev = device or cfg.teacher.train.device  # resolved in each worker (its own GPU, if any)
    with errors():
        r = build_cache_dask(cfg, functools.partial(_worker_teacher, path, dev), functools.partial(make_source, cfg),
                             scheduler=scheduler, workers=workers, world=world if world > 1 else None,
                             gpus_per_writer=gpus_per_writer, lock_wait=wait, plan=True, record=True)
    typer.echo("\n".join(r.plan_lines))
    _report(r, f"{r.world} dask writers" + (f" on {scheduler}" if scheduler else f", {workers} local workers"))


def _report(r, writers: str | None = None) -> None:
    typer.echo(f"cache: {r.path}")
    typer.echo(f"shards written {r.shards_written}, skipped {r.shards_skipped} of {r.shards_total}; "
               f"{r.samples_written} samples, {r.bytes_written / 1e6:.1f} MB in {r.seconds:.1f} s "
               f"({r.samples_per_s:.1f} samples/s; teacher alone {r.teacher_samples_per_s:.1f} samples/s"
               f"{' per writer' if writers else ''})" + (f" with {writers}" if writers else ""))


@app.command("info")
def info_cmd(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, teacher: TeacherOpt = None,
             path: PathOpt = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False):
    """Size on disk, shapes, fingerprint, completeness and codec of a cache."""
    from attnfd_pipeline.cache import describe_cache

    cfg = load(config, set_)
    with errors():
        d = describe_cache(_locate(cfg, teacher, path))
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(f"cache: {d['path']}")
    typer.echo(f"fingerprint: {d['fingerprint']}")
    typer.echo(f"size on disk: {d['size_bytes'] / 1e6:.2f} MB")
    typer.echo(f"complete: {'yes' if d['complete'] else 'no'} ({d['shards_committed']}/{d['shards_total']} shards, "
               f"{d['samples_committed']}/{d['num_images'] * d['K']} samples)")
    bits = f", mantissa bits {d['mantissa_bits']}" if d["encoding"] == "float16" else ""
    typer.echo(f"codec: {d['codec']} level {d['level']}, {d['dtype']}{bits}")
    pool = ", ".join(f"{p} by {f}" for p, f in d["pool"].items()) or "none"
    typer.echo(f"encoding: {d['encoding']}; pooled: {pool}")
    for name, t in d["targets"].items():
        typer.echo(f"  {name:>8}: shape {tuple(t['shape'])}, stride {t['stride']}, "
                   f"{t['stored_bytes_per_sample'] / 1e3:.1f} kB/sample {d['encoding']}, "
                   f"{t['bytes_on_disk'] / 1e6:.2f} MB on disk")


@app.command("verify")
def verify_cmd(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, teacher: TeacherOpt = None,
               path: PathOpt = None,
               replay: Annotated[int, typer.Option(min=0, help="Rows to re-augment and compare with the stored hashes.")] = 8,
               workers: Annotated[int, typer.Option(min=1, help="Threads reading shards in parallel.")] = 2,
               allow_incomplete: Annotated[bool, typer.Option(help="Exit 0 on a correct but incomplete cache.")] = False):
    """Re-read every committed sample: chunk checksums, NaN scan, manifest ↔ arrays, replay check.
    Exit 1 naming every bad (image, seed, target)."""
    from attnfd_pipeline.cache import load_info, verify_cache

    cfg = load(config, set_)
    with errors():
        d = _locate(cfg, teacher, path)
        load_info(d)  # a path that is not a cache is named before the dataset is even listed
        source = make_source(cfg) if replay > 0 or path is None else None
        report = verify_cache(d, source=source, replay=replay, workers=workers)
    typer.echo("\n".join(report.lines()))
    if not report.ok:
        raise typer.Exit(1)
    if not report.complete and not allow_incomplete:
        typer.secho(f"incomplete: {report.shards_committed}/{report.shards_total} shards committed "
                    f"(resume with `attnfd cache build`, or pass --allow-incomplete)", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
