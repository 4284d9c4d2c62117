"""The `attnfd` command line: one sub-command per stage; bodies only call the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from attnfd_pipeline.data.demo import DEMO_N_TRAIN, DEMO_N_VAL
from stages.bench import bench, bench_accuracy, bench_feed, bench_gpu
from stages.inference import evaluate, export, predict
from stages.common import DEFAULT_CONFIG, ConfigOpt, SetOpt, errors, load, logs, show_paths
from stages.report import curves, report, studies, visualize
from stages.storage import bench_storage
from stages.student import student, sweep
from stages.teacher import app as teacher_app

app = typer.Typer(help="AttnFD pipeline: teacher → cache → student.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


def _version(show: bool) -> None:
    if show:
        from attnfd_pipeline import __version__

        typer.echo(f"attnfd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    """AttnFD pipeline: teacher → cache → student."""


data_app = typer.Typer(help="Datasets: generate the embedded demo, validate a dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")
app.command("student")(student)
app.command("sweep")(sweep)
app.command("bench")(bench)
app.command("bench-accuracy")(bench_accuracy)
app.command("bench-feed")(bench_feed)
app.command("bench-gpu")(bench_gpu)
app.command("bench-storage")(bench_storage)
app.command("report")(report)
app.command("studies")(studies)
app.command("visualize")(visualize)
app.command("evaluate")(evaluate)
app.command("predict")(predict)
app.command("export")(export)
app.command("curves")(curves)

try:  # the cache sub-app
    from stages.cache import app as cache_app

    app.add_typer(cache_app, name="cache")
except ImportError:  # pragma: no cover
    pass


@data_app.command("demo")
def data_demo(out: Annotated[Path, typer.Option(help="Output folder (VOC layout).")] = Path("data/demo"),
              seed: int = 0, n_train: int = DEMO_N_TRAIN, n_val: int = DEMO_N_VAL, workers: int = 2):
    """Generate the embedded demo dataset (deterministic by seed; skipped when already there)."""
    from attnfd_pipeline.data.demo import generate_demo

    with errors():
        path = generate_demo(out, seed=seed, n_train=n_train, n_val=n_val, workers=workers)
    typer.echo(f"demo dataset: {path}")


@data_app.command("prepare")
def data_prepare(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None):
    """Make the config's dataset ready: generate the embedded demo if needed, then check the dataset."""
    from attnfd_pipeline.data.check import check_dataset, format_problems
    from attnfd_pipeline.data.datasets import dataset_info
    from attnfd_pipeline.data.demo import generate_demo

    logs(False, False)
    cfg = load(config, set_)
    show_paths(cfg)
    with errors():
        if cfg.data.dataset == "demo":
            generate_demo(cfg.data.root, seed=cfg.augment.seed)
        problems = check_dataset(dataset_info(cfg), cfg.data.root, [cfg.data.train_split, cfg.data.val_split])
    if problems:
        typer.echo(format_problems(problems), err=True)
        raise typer.Exit(1)
    typer.echo(f"{cfg.data.dataset} at {cfg.data.root}: ready")


@data_app.command("check")
def data_check(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
               split: Annotated[Optional[list[str]], typer.Option(help="Splits to check (default: train and val).")] = None):
    """Validate a dataset before anything trains; every problem is reported with its file."""
    from attnfd_pipeline.data.check import check_dataset, format_problems, masks_without_images, split_counts
    from attnfd_pipeline.data.datasets import dataset_info

    logs(False, False)
    cfg = load(config, set_)
    show_paths(cfg)
    splits = split or [cfg.data.train_split, cfg.data.val_split]
    with errors():
        info = dataset_info(cfg)
        problems = check_dataset(info, cfg.data.root, splits)
        orphans = masks_without_images(info, cfg.data.root, splits)
        counts = split_counts(info, cfg.data.root, splits)
    typer.echo(f"{cfg.data.dataset} at {cfg.data.root}: " + ", ".join([f"{info.num_classes} classes",
                                                                       *(f"{s} {n} images" for s, n in counts.items())]))
    if orphans:
        shown = "".join(f"\n  {p}" for p in orphans[:10]) + (f"\n  ... and {len(orphans) - 10} more" if len(orphans) > 10 else "")
        typer.secho(f"warning: {len(orphans)} mask(s) without their image (not read by any split):{shown}", err=True,
                    fg=typer.colors.YELLOW)
    if problems:
        typer.echo(format_problems(problems), err=True)
        raise typer.Exit(1)
    typer.echo(f"{cfg.data.dataset} at {cfg.data.root}: splits {', '.join(splits)} OK")


@app.command("results")
def results_cmd(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None):
    """Print the result table (teacher, students) of the config's runs as Markdown."""
    from attnfd_pipeline.experiments.results import collect_results, collect_stages, format_table

    cfg = load(config, set_)
    with errors():
        typer.echo(format_table(collect_results(cfg)))
        for line in collect_stages(cfg):
            typer.echo(line)


if __name__ == "__main__":  # pragma: no cover
    app()
