"""`attnfd bench` / `make bench`: what caching buys — step time, memory, cache build and read throughput,
storage — measured side by side in one run; writes ``results.json`` and ``results.md``.

`attnfd bench-accuracy` / `make bench-accuracy`: what distillation buys — teacher, student and every
method on the config's data (``attnfd_pipeline.experiments.accuracy``); writes ``accuracy.json`` and ``accuracy.md``.

`attnfd bench-feed`: the host CPU cost of the feed at the paper's shapes, per sample
(``attnfd_pipeline.experiments.bench.feed``); writes ``feed.json`` and ``feed.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import DEFAULT_CONFIG, ConfigOpt, QuietOpt, SetOpt, VerboseOpt, errors, load, logs

WorkDirOpt = Annotated[Optional[Path], typer.Option(help="Where the temporary dataset, teacher and cache go "
                                                         "(default: the system temp dir).")]


def goal_text(m: dict) -> str:
    """``"  (goal G: met|MISSED)"`` for a figure record that has a goal, else ``""``."""
    return f"  (goal {m['goal']}: {'met' if m.get('met') else 'MISSED'})" if "goal" in m else ""


def bench(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
          out: Annotated[Path, typer.Option(help="Folder for results.json and results.md.")] = Path("bench"),
          quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes (seconds): keeps the harness working; "
                                                              "figures are not meaningful.")] = False,
          repeats: Annotated[Optional[int], typer.Option(min=1, help="Interleaved repeats (default: 4, quick: 1).")] = None,
          threads: Annotated[Optional[int], typer.Option(min=1, help="torch intra-op threads (default: the cores the "
                                                              "loader workers leave, at least 1).")] = None,
          work_dir: WorkDirOpt = None,
          allow_busy: Annotated[bool, typer.Option("--allow-busy", help="Measure even when the load average "
                                                                        "at start is >= 0.5 (the wall-clock figures "
                                                                        "then carry the other load).")] = False,
          wait_quiet: Annotated[float, typer.Option(min=0, help="Seconds to wait for the load average to fall below 0.5 "
                                                         "before starting (0: check once).")] = 0.0):
    """Benchmark plain vs cached vs online distillation: step time, peak memory, cache build and read
    throughput, storage, sweep economics (interleaved ratios, medians over repeats)."""
    from attnfd_pipeline.experiments.bench import TABLE_KEYS, BusyMachineError, run_bench

    with errors():
        try:
            res = run_bench(out, quick=quick, repeats=repeats, recipe=config, overrides=list(set_ or []),
                            work_dir=work_dir, threads=threads, allow_busy=allow_busy,
                            wait_quiet=wait_quiet)
        except BusyMachineError as e:
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None
    for key in (*TABLE_KEYS, "storage"):
        m = res[key]
        v = m.get("value")
        typer.echo(f"{key:38s} {v if v is None else round(v, 3)}{goal_text(m)}")
    typer.echo(f"results: {out / 'results.json'}, {out / 'results.md'}")


def bench_feed(config: Annotated[Path, typer.Option(help="Recipe whose augmentation and codec are measured.")]
               = Path("configs/voc.toml"),
               out: Annotated[Path, typer.Option(help="Folder for feed.json and feed.md.")] = Path("bench"),
               quick: Annotated[bool, typer.Option("--quick", help="Tiny shapes (seconds): keeps the harness "
                                                                   "working; figures are not meaningful.")] = False,
               device: Annotated[str, typer.Option(help="Where the device-side encode/decode runs (cpu, cuda).")]
               = "cpu",
               demo_config: Annotated[Path, typer.Option(help="Config of the trained demo teacher whose maps "
                                                              "the codec table also measures.")]
               = Path("configs/demo.toml"),
               work_dir: WorkDirOpt = None):
    """The host CPU cost of feeding a GPU at the paper's shapes (R101 teacher, 513 px, B + E + D), per sample:
    build host work, Stage 2 target read, image side, device encode/decode, bytes, physical floors, codecs;
    the feed goals met or missed."""
    from attnfd_pipeline.experiments.bench.feed import run_feed_bench

    with errors():
        res = run_feed_bench(out, quick=quick, recipe=config, work_dir=work_dir, device=device,
                             demo_config=demo_config)
    for g in res["int8"]["goals"]:
        typer.echo(f"int8 {g['figure']:24s} {g['value'] if isinstance(g['value'], int) else round(g['value'], 2)}"
                   f"{goal_text(g)}")
    typer.echo(f"results: {out / 'feed.json'}, {out / 'feed.md'}")


def bench_gpu(config: Annotated[Path, typer.Option(help="Recipe (augmentation, codec, loss) of the check.")]
              = Path("configs/voc.toml"),
              out: Annotated[Path, typer.Option(help="Folder for gpu.json and gpu.md.")] = Path("bench"),
              quick: Annotated[bool, typer.Option("--quick", help="CPU, tiny sizes (seconds): keeps the check "
                                                                  "working; figures are not meaningful.")] = False,
              device: Annotated[str, typer.Option(help="The GPU to measure (torch device).")] = "cuda",
              work_dir: WorkDirOpt = None):
    """The prepared GPU check (scripts/gpu_check.sh, <= 8 min on one GPU): R101 -> R18 at 513 px, batch 6, AMP,
    random weights: cached vs online vs in-memory step time and peak GPU memory, cache build vs bare teacher,
    DataLoader feed rate with 4 and 8 workers vs the cached step's consumption."""
    from attnfd_pipeline.experiments.bench.gpu import run_gpu_check

    with errors():
        res = run_gpu_check(out, quick=quick, recipe=config, work_dir=work_dir, device=device)
    for key in ("step_ratio_cached_over_online", "step_ratio_cached_over_inmemory",
                "peak_mem_ratio_cached_over_online", "cache_build_over_teacher_inference"):
        m = res[key]
        typer.echo(f"{key:38s} {m['value'] if m['value'] is None else round(m['value'], 3)}{goal_text(m)}")
    typer.echo(f"results: {out / 'gpu.json'}, {out / 'gpu.md'}")


AccuracyOutOpt = Annotated[Optional[Path], typer.Option("--out", help="Folder for accuracy.json and accuracy.md "
                                                                      "(default: reports/<config name>/).")]


def bench_accuracy(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
                   seeds: Annotated[int, typer.Option(min=1, help="Seeds of the student and of AttnFD (cached and "
                                                           "online): the rows the goals compare.")] = 3,
                   extra_seeds: Annotated[int, typer.Option(min=0, help="Seeds of the rival methods (every registered method but AttnFD).")] = 1,
                   compact: Annotated[list[str] | None, typer.Option(
                       help="Compact cache storage AttnFD also trains on (--seeds seeds, paired with the float16 "
                            "cache); repeatable: int8, int8+poolD2 (make bench-accuracy: both).")] = None,
                   out: AccuracyOutOpt = None, verbose: VerboseOpt = False, quiet: QuietOpt = False):
    """Accuracy of the teacher, the student and the student with each rival (KD, LAD, AICSD, Af-DCD, CIRKD,
    DIST) and AttnFD (cached and online) on any config's data, with paired differences over shared seeds; checks the goals.
    Resumable: finished runs are skipped."""
    import shlex

    from attnfd_pipeline.experiments.accuracy import goals, run_accuracy_bench

    logs(verbose, quiet)
    cfg = load(config, set_)
    out = out or Path("reports") / cfg.name  # a user's config must not overwrite the committed demo bench
    storages = list(dict.fromkeys(compact or []))
    command = " ".join(["attnfd bench-accuracy", "--config", shlex.quote(str(config)),
                        *(f"--set {shlex.quote(o)}" for o in set_ or []), f"--seeds {seeds}",
                        f"--extra-seeds {extra_seeds}", *(f"--compact {shlex.quote(c)}" for c in storages),
                        "--out", shlex.quote(str(out))])
    with errors():
        results = run_accuracy_bench(cfg, out, seeds=seeds, extra_seeds=extra_seeds, compact=storages,
                                     command=command)
    for g in goals(results):
        value = "–" if g.value is None else f"{g.value:.2f}"
        typer.echo(f"{g.text}: {value} ({g.status})")
    typer.echo(f"results: {out / 'accuracy.json'}, {out / 'accuracy.md'}")


def main():  # pragma: no cover - thin entry point
    typer.run(bench)


if __name__ == "__main__":  # pragma: no cover
    main()
