"""`attnfd bench-storage`: fidelity, size and speed of the compact cache encodings on the config's teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import DEFAULT_CONFIG, ConfigOpt, SetOpt, errors, load


def bench_storage(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
                  teacher: Annotated[Optional[Path], typer.Option(help="Teacher bundle (default: the config's).")] = None,
                  out: Annotated[Path, typer.Option(help="Output folder: storage.json and storage.md.")] = Path("bench"),
                  crops: Annotated[str, typer.Option(help="Comma-separated square crops.")] = "64,257",
                  images: Annotated[int, typer.Option(min=1, help="Training images per crop.")] = 8,
                  checkpoint: Annotated[Optional[Path], typer.Option(
                      help="Measure on a teacher training checkpoint (train/last.pt) instead of the bundle.")] = None):
    """Every storage variant (float16 / int8, with and without pooling) on the trained teacher's maps: error
    of the channel-normalised maps, AttnFD loss-gradient cosine, size vs float16, encode/decode MB/s per core."""
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.experiments.fidelity import storage_markdown, write_storage_bench
    from attnfd_pipeline.teacher import bundle_path, load_teacher

    cfg = load(config, set_)
    with errors():
        if checkpoint is not None:
            from attnfd_pipeline.experiments.fidelity import teacher_from_checkpoint

            t = teacher_from_checkpoint(cfg, checkpoint)
        else:
            t = load_teacher(teacher or bundle_path(cfg), "cpu")
        source = ImageSource.from_config(cfg, split=cfg.data.train_split)
        fig = write_storage_bench(cfg, t, source, out, crops=tuple(int(c) for c in crops.split(",")), images=images)
    typer.echo(storage_markdown(fig))
    typer.echo(json.dumps({"recommended": fig["recommended"]}))
