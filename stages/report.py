"""`attnfd report` and `attnfd visualize`: paper-style tables and figures from finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import DEFAULT_CONFIG, ConfigOpt, QuietOpt, SetOpt, VerboseOpt, errors, load, logs


def report(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
           out: Annotated[Optional[Path], typer.Option(help="Output folder (default: reports/<config name>/).")] = None,
           runs: Annotated[Optional[list[str]], typer.Option(
               "--runs", help="Extra run roots to include, e.g. runs/demo_fitted (repeatable).")] = None):
    """Markdown tables + PNG figures from every run of the config: methods, α, K, points, norm, CBAM mode."""
    from attnfd_pipeline.experiments.report import build_report

    cfg = load(config, set_)
    with errors():
        files = build_report(cfg, out or Path("reports") / cfg.name, extra_roots=runs or [])
    for name, path in files.items():
        typer.echo(f"{name}: {path}")


def _csv(text: str, kind, name: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: a comma-separated list of numbers", param_hint=name) from None


def studies(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
            study: Annotated[Optional[list[str]], typer.Option(
                "--study", help="Only these studies (repeatable): reference, K, methods, alpha, points, norm, "
                                "teacher_mode. Default: all.")] = None,
            seeds: Annotated[int, typer.Option(min=1,
                help="Seeds of every row compared with a reference row (reference, methods, K, α, points, norm, "
                     "teacher CBAM mode): differences are paired over them.")] = 3,
            extra_seeds: Annotated[int, typer.Option(min=0, help="Seeds of the plain student at each other K.")] = 1,
            k: Annotated[str, typer.Option("--k", help="Cached augmentation seeds K of the K study.")] = "1,2,4,8",
            alpha: Annotated[str, typer.Option("--alpha", help="α values of the α sweep (besides the config's).")]
            = "3,10,100,300",
            out: Annotated[Optional[Path], typer.Option(help="Report folder (default: reports/<config name>/).")]
            = None, verbose: VerboseOpt = False, quiet: QuietOpt = False):
    """Train every run the report's studies need (missing ones only: resumable), then write the report."""
    from attnfd_pipeline.experiments.studies import STUDIES, run_studies

    logs(verbose, quiet)
    cfg = load(config, set_)
    with errors():
        files = run_studies(cfg, out or Path("reports") / cfg.name, studies=study or STUDIES, seeds=seeds,
                            extra_seeds=extra_seeds, ks=_csv(k, int, "--k"), alphas=_csv(alpha, float, "--alpha"))
    for name, path in files.items():
        typer.echo(f"{name}: {path}")


def curves(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
           runs: Annotated[str, typer.Option(help="Run folders under runs/<name>/ (glob), e.g. 'student/a0_*' or "
                                                  "'teacher/train'.")] = "student/*",
           out: Annotated[Optional[Path], typer.Option(help="Folder of the PNGs (default: reports/<name>/curves/).")]
           = None):
    """Training curves of several runs overlaid: one PNG per quantity (per step and per epoch), legend by run."""
    from attnfd_pipeline.experiments.curves import draw_curves

    cfg = load(config, set_)
    with errors():
        files = draw_curves(cfg, runs=runs, out=out)
    typer.echo(f"{len(files)} figures in {files[0].parent}")


def visualize(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
              image_index: Annotated[int, typer.Option("--image-index", min=0, help="Validation image index.")] = 0,
              out: Annotated[Optional[Path], typer.Option(
                  help="PNG to write (default: reports/<name>/attention_<N>.png).")] = None,
              run: Annotated[Optional[str], typer.Option(
                  help="Student run folder or name (default: the config's run).")] = None):
    """Image, raw feature map and refined map F'' for teacher and student (paper Fig. 1)."""
    from attnfd_pipeline.experiments.visualize import visualize as draw

    cfg = load(config, set_)
    with errors():
        path = draw(cfg, image_index, out or Path("reports") / cfg.name / f"attention_{image_index}.png", run_dir=run)
    typer.echo(f"attention picture: {path}")
