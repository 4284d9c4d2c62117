"""What a stage checks before it writes anything: the dataset files, the student's backbone weights,
the class count."""

from __future__ import annotations

from attnfd_pipeline.config import Config
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.errors import UserError


def check_dataset_inputs(cfg: Config, splits=None) -> None:
    """Before a stage writes anything: the splits are listed and not empty, every listed image opens
    (header) with the size of its label, every label decodes with legal values. Raises ``DataError``
    naming the files (``attnfd data check`` decodes the images fully)."""
    from attnfd_pipeline.data.check import check_dataset, format_problems
    from attnfd_pipeline.data.datasets import DataError, dataset_info

    splits = list(splits or (cfg.data.train_split, cfg.data.val_split))
    problems = check_dataset(dataset_info(cfg), cfg.data.root, splits, decode_images=False)
    if problems:
        raise DataError(problems[0].path, f"dataset {cfg.data.dataset!r} at {cfg.data.root} (splits "
                                          f"{', '.join(splits)}): {format_problems(problems, limit=10)}")


def check_student_inputs(cfg: Config) -> None:
    """What Stage 2 can check before it writes anything, beyond what ``run_student`` checks itself:
    the dataset files, and a ``student.model.backbone_weights`` file that exists and fits the model."""
    from attnfd_pipeline.models import build_model

    check_dataset_inputs(cfg)
    m = cfg.student.model
    if m.backbone_weights:
        build_model(m.name, cfg.data.num_classes, output_stride=m.output_stride,
                    backbone_weights=m.backbone_weights)


def num_classes_of(cfg: Config, source: ImageSource) -> int:
    if cfg.num_classes and cfg.num_classes != source.info.num_classes:
        raise UserError(f"num_classes = {cfg.num_classes} but dataset {source.info.name!r} has "
                         f"{source.info.num_classes} classes")
    return source.info.num_classes
