"""`attnfd evaluate | predict | export`: use any trained network (teacher bundle, student run, exported file)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import DEFAULT_CONFIG, ConfigOpt, SetOpt, errors, load

CheckpointOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint", "-k", help="Teacher bundle, student run folder or its best.pt, or an exported .pt/.onnx "
                               "(default: the config's teacher bundle).")]


def evaluate(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, checkpoint: CheckpointOpt = None,
             bundle: Annotated[Optional[Path], typer.Option(help="Same as --checkpoint (kept for scripts).")] = None,
             split: Annotated[Optional[str], typer.Option(help="Split to score (default: data.val_split).")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print all metrics as JSON.")] = False,
             out: Annotated[Optional[Path], typer.Option(help="Also write the metrics as JSON to this file.")] = None):
    """Score a checkpoint on the validation split under eval.protocol: mIoU, pixel acc, class acc, FWIoU and
    IoU per class (Markdown, or --json)."""
    from attnfd_pipeline.inference import evaluate_checkpoint, format_metrics
    from attnfd_pipeline.teacher import bundle_path
    from attnfd_pipeline.utils import atomic_write_json

    if checkpoint is not None and bundle is not None and checkpoint != bundle:
        raise typer.BadParameter(f"--checkpoint {checkpoint} and --bundle {bundle} name two networks; give one",
                                 param_hint="--checkpoint / --bundle")
    cfg = load(config, set_)
    with errors():
        m = evaluate_checkpoint(cfg, checkpoint or bundle or bundle_path(cfg), split=split)
    m = {k: v for k, v in m.items() if k != "confusion"} if as_json or out else m
    if out is not None:
        atomic_write_json(out, m)
    typer.echo(json.dumps(m, indent=2) if as_json else format_metrics(m))


def predict(input_: Annotated[str, typer.Option("--input", "-i", help="Image folder, file or glob ('imgs/*.jpg').")],
            out: Annotated[Path, typer.Option(help="Output folder: <stem>.png palette masks.")],
            config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, checkpoint: CheckpointOpt = None,
            overlay: Annotated[bool, typer.Option("--overlay", help="Also write overlay/<stem>.jpg.")] = False,
            batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 8,
            progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True):
    """Segment images with any checkpoint: one palette PNG per image at its original size (unreadable images
    are reported and skipped)."""
    from attnfd_pipeline.inference import load_segmenter, predict_images
    from attnfd_pipeline.teacher import bundle_path

    cfg = load(config, set_)
    with errors():
        seg = load_segmenter(checkpoint or bundle_path(cfg))
        result = predict_images(cfg, seg, input_, out, overlay=overlay, batch_size=batch_size, progress=progress)
    typer.echo(f"{len(result.written)} masks written to {out} ({len(result.skipped)} skipped, "
               f"{result.seconds:.1f} s)")


@contextlib.contextmanager
def removed_on_failure(path: Path):
    """A command that fails (or is interrupted) after writing ``path`` removes it: nothing half-checked stays."""
    before = path.stat().st_mtime_ns if path.is_file() else None
    try:
        yield
    except BaseException:
        if path.is_file() and path.stat().st_mtime_ns != before:  # written by this command
            path.unlink()
        raise


def export(out: Annotated[Path, typer.Option(help="File to write (.pt for TorchScript, .onnx for ONNX).")],
           config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, checkpoint: CheckpointOpt = None,
           format_: Annotated[str, typer.Option("--format", help="torchscript or onnx (the onnx extra).")] = "torchscript",
           check: Annotated[bool, typer.Option(help="Compare the exported model with the eager one.")] = True):
    """Export the network alone (no distillation heads): input normalised images, output logits."""
    from attnfd_pipeline.inference import (check_export_name, compare_outputs, dataset_info, export_segmenter,
                                           load_segmenter)
    from attnfd_pipeline.teacher import bundle_path

    cfg = load(config, set_)
    with errors(), removed_on_failure(out):
        check_export_name(format_, out)
        seg = load_segmenter(checkpoint or bundle_path(cfg))
        crop = tuple(cfg.augment.crop_size)
        path = export_segmenter(seg, format_, out, example_hw=crop, info=dataset_info(cfg))
        typer.echo(f"{format_} model written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
        if check:  # another size than the traced one: the exported graph must not have frozen it
            hw = (crop[0] + 16, crop[1] + 32)
            diff = compare_outputs(seg, load_segmenter(path), hw)
            typer.echo(f"max |exported - eager| = {diff:.2e} on a 2x3x{hw[0]}x{hw[1]} input")
            if diff > 1e-4:
                typer.secho("warning: the exported model differs from the eager one by more than 1e-4", err=True,
                            fg=typer.colors.YELLOW)
