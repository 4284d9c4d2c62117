"""`attnfd teacher` / `python -m stages.teacher`: Stage 1a — train the teacher, fit its CBAMs, freeze, bundle.
`attnfd teacher import PATH` brings in a teacher trained elsewhere; `attnfd teacher export OUT` writes one out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from attnfd_pipeline.runs import reusable_teacher, run_teacher
from stages.common import (DEFAULT_CONFIG, ConfigOpt, ForceOpt, QuietOpt, SeedOpt, SetOpt, TensorboardOpt, VerboseOpt,
                           errors, interrupts, load, logs, option_overrides, rerun_command, show_paths)

app = typer.Typer(help="Stage 1a: train the teacher (default), or import / export a trained one.",
                  pretty_exceptions_enable=False)


@app.callback(invoke_without_command=True)
def teacher(ctx: typer.Context, config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, seed: SeedOpt = None,
            resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
            force: ForceOpt = False, tensorboard: TensorboardOpt = False, verbose: VerboseOpt = False,
            quiet: QuietOpt = False):
    """Train the teacher (CE) with its CBAMs per teacher.cbam_mode, then freeze both into teacher_bundle.pt. A
    bundle of the same recipe is reused; one of another recipe is refused (--force replaces it)."""
    if ctx.invoked_subcommand is not None:
        return
    logs(verbose, quiet)
    overrides = option_overrides(set_, seed=("teacher.train.seed", seed))
    overrides += ["teacher.train.tensorboard=true"] if tensorboard else []
    cfg = load(config, overrides)
    show_paths(cfg)
    from attnfd_pipeline.engine import distributed

    with errors():
        reused = None if force else reusable_teacher(cfg)
    if reused is not None:
        typer.echo(f"teacher bundle: {reused} (finished, same recipe: reused; --force trains it again)")
        return
    with interrupts(rerun_command("teacher", config, overrides, force=force)), errors(), distributed.launched():
        path = run_teacher(cfg, resume=resume)
    if distributed.is_main():
        typer.echo(f"teacher bundle: {path}")


@app.command("import")
def teacher_import(
        path: Annotated[Path, typer.Argument(help="Checkpoint of a trained teacher.")],
        config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
        fmt: Annotated[str, typer.Option("--format", help="auto | reference | torchvision | state_dict")] = "auto",
        cbam_mode: Annotated[Optional[str], typer.Option(
            "--cbam-mode", help="fitted (default) | parameter_free | untrained")] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing teacher bundle.")] = False):
    """Import a trained teacher (the seeds' reference checkpoints, or this project's state dict) into the
    config's teacher bundle, so that `attnfd cache build` and `attnfd student` run on it."""
    from attnfd_pipeline.runs import run_teacher_import

    cfg = load(config, set_)
    with errors():
        out = run_teacher_import(cfg, path, fmt=fmt, cbam_mode=cbam_mode, force=force)
    typer.echo(f"teacher bundle: {out} (imported from {path})")


@app.command("export")
def teacher_export(out: Annotated[Path, typer.Argument(help="Where to write the state dict (.pt).")],
                   config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
                   bundle: Annotated[Optional[Path], typer.Option(help="Teacher bundle (default: the config's).")] = None):
    """Write the teacher bundle's network as a plain state dict (the `state_dict` format of `teacher import`)."""
    from attnfd_pipeline.teacher import bundle_path, export_state_dict

    cfg = load(config, set_)
    with errors():
        written = export_state_dict(bundle or bundle_path(cfg), out)
    typer.echo(f"state dict: {written}")


def main():  # pragma: no cover - thin entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
