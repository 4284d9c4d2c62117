"""`attnfd student` / `python -m stages.student`: Stage 2 — train the student from the cache."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from stages.common import DEFAULT_CONFIG, ConfigOpt, SeedOpt, SetOpt, errors, load


def student(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, seed: SeedOpt = None,
            alpha: Annotated[Optional[float], typer.Option(help="Distillation weight α (0 = plain student).")] = None,
            mode: Annotated[Optional[str], typer.Option(help="cached (default) or online (teacher every step).")] = None,
            resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False):
    """Train the student with L = CE + α·L_Attn against the cached teacher targets."""
    from attnfd_pipeline.student import run_student

    overrides = list(set_ or [])
    overrides += [f"student.train.seed={seed}"] if seed is not None else []
    overrides += [f"student.alpha={alpha}"] if alpha is not None else []
    overrides += [f'student.mode="{mode}"'] if mode is not None else []
    cfg = load(config, overrides)
    with errors():
        result = run_student(cfg, resume=resume)
    typer.echo(f"{result['run']}: best mIoU {result['best_miou'] * 100:.2f} "
               f"({result['epochs']} epochs, {result['train_seconds']:.0f} s)")


def main():  # pragma: no cover - thin entry point
    typer.run(student)


if __name__ == "__main__":  # pragma: no cover
    main()
