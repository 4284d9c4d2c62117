"""`attnfd student` / `python -m stages.student`: Stage 2 — train the student from the cache."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attnfd_pipeline.config import TargetSource
from stages.common import (DEFAULT_CONFIG, ConfigOpt, ForceOpt, QuietOpt, SeedOpt, SetOpt, TensorboardOpt, VerboseOpt,
                           errors, interrupts, load, logs, option_overrides, rerun_command, show_paths)


def student(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, seed: SeedOpt = None,
            alpha: Annotated[Optional[float], typer.Option(help="Distillation weight α (0 = plain student).")] = None,
            targets: Annotated[Optional[TargetSource], typer.Option(
                help="Where the teacher targets come from: cached (the cache), online-replay (the teacher every step "
                     "on the replayed cached crops) or online-fresh (the teacher on a fresh augmentation every epoch). "
                     "Default: the config's student.targets.")] = None,
            mode: Annotated[Optional[str], typer.Option(
                hidden=True, help="Older spelling: cached or online (= --targets online-replay).")] = None,
            online_fresh: Annotated[bool, typer.Option(
                "--online-fresh", hidden=True, help="Older spelling: with --mode online, = --targets online-fresh.")]
            = False,
            resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
            force: ForceOpt = False, tensorboard: TensorboardOpt = False, verbose: VerboseOpt = False,
            quiet: QuietOpt = False):
    """Train the student with L = CE + α·L_Attn against the cached teacher targets. A finished run of the same
    recipe is reused; one of another recipe is refused (--force replaces it)."""
    from attnfd_pipeline.runs import forget_finished_student, reusable_student, run_student

    logs(verbose, quiet)
    overrides = option_overrides(set_, seed=("student.train.seed", seed), alpha=("student.alpha", alpha))
    overrides += ["student.train.tensorboard=true"] if tensorboard else []
    overrides += target_overrides(targets, mode, online_fresh)
    cfg = load(config, overrides)
    show_paths(cfg)
    from attnfd_pipeline.engine import distributed

    with errors():
        reused = None if force else reusable_student(cfg)
        if force and distributed.is_main():
            forget_finished_student(cfg)
    if reused is not None:
        typer.echo(f"{reused['run']}: finished run reused, best mIoU {reused['best_miou'] * 100:.2f} "
                   f"({reused['epochs']} epochs; --force trains it again)")
        return
    with interrupts(rerun_command("student", config, overrides, force=force)), errors(), distributed.launched():
        from attnfd_pipeline.runs import check_student_inputs

        check_student_inputs(cfg)  # dataset files, backbone weights: before anything is written
        result = run_student(cfg, resume=resume)
    if not distributed.is_main():
        return
    typer.echo(f"{result['run']}: best mIoU {result['best_miou'] * 100:.2f} "
               f"({result['epochs']} epochs, {result['train_seconds']:.0f} s)")


def target_overrides(targets: TargetSource | None, mode: str | None, online_fresh: bool) -> list[str]:
    """The ``--set`` overrides of ``--targets`` or of its older spelling ``--mode`` / ``--online-fresh``
    (both spellings at once: refused, as in a config file)."""
    if targets is not None:
        if mode is not None or online_fresh:
            raise typer.BadParameter("give --targets alone: --mode / --online-fresh are its older spelling",
                                     param_hint="--targets")
        return [f'student.targets="{targets.value}"']
    older = [f'student.mode="{mode}"'] if mode is not None else []
    return older + (["student.online_fresh=true"] if online_fresh else [])


def main():  # pragma: no cover - thin entry point
    typer.run(student)


if __name__ == "__main__":  # pragma: no cover
    main()


def sweep(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
          alpha: Annotated[str, typer.Option(help="Comma-separated α values, e.g. 0.1,1,2,10.")] = "0.1,1,2,10",
          seed: Annotated[str, typer.Option(help="Comma-separated seeds, e.g. 0,1,2.")] = "0",
          scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing dask scheduler.")] = None,
          workers: Annotated[int, typer.Option(min=1, help="LocalCluster worker processes (no --scheduler).")] = 1,
          gpus_per_run: Annotated[int, typer.Option(min=0, help="GPU resource each run claims on the cluster.")] = 0,
          tensorboard: TensorboardOpt = False, verbose: VerboseOpt = False, quiet: QuietOpt = False):
    """Run an α × seed grid on one cache on a dask.distributed cluster; finished runs are skipped."""
    from attnfd_pipeline.experiments.results import collect_results, format_table
    from attnfd_pipeline.experiments.sweep import parse_list, run_sweep

    logs(verbose, quiet)
    cfg = load(config, list(set_ or []) + (["student.train.tensorboard=true"] if tensorboard else []))
    with errors():
        alphas, seeds = parse_list(alpha, float), parse_list(seed, int)
        done = run_sweep(cfg, alphas, seeds, scheduler=scheduler, workers=workers, gpus_per_run=gpus_per_run)
    typer.echo(f"{len(done)} runs trained ({len(alphas) * len(seeds) - len(done)} already done)")
    typer.echo(format_table(collect_results(cfg)))
