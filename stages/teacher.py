"""`attnfd teacher` / `python -m stages.teacher`: Stage 1a — train the teacher, fit its CBAMs, freeze, bundle."""

from __future__ import annotations

from typing import Annotated

import typer

from attnfd_pipeline.runs import run_teacher
from stages.common import (DEFAULT_CONFIG, ConfigOpt, QuietOpt, SeedOpt, SetOpt, TensorboardOpt, VerboseOpt, errors,
                           load, logs)


def teacher(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, seed: SeedOpt = None,
            resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
            tensorboard: TensorboardOpt = False, verbose: VerboseOpt = False, quiet: QuietOpt = False):
    """Train the teacher (CE) with its CBAMs per teacher.cbam_mode, then freeze both into teacher_bundle.pt."""
    logs(verbose, quiet)
    overrides = list(set_ or []) + ([f"teacher.train.seed={seed}"] if seed is not None else [])
    overrides += ["teacher.train.tensorboard=true"] if tensorboard else []
    cfg = load(config, overrides)
    from attnfd_pipeline.engine import distributed

    with errors(), distributed.launched():  # under torchrun: one DDP rank (process group from the env)
        path = run_teacher(cfg, resume=resume)
    if distributed.is_main():
        typer.echo(f"teacher bundle: {path}")


def main():  # pragma: no cover - thin entry point
    typer.run(teacher)


if __name__ == "__main__":  # pragma: no cover
    main()

