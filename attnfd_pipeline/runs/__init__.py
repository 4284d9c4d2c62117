"""Stage runners: compose config, data, models, engine and cache into one call per stage.

``stages/`` (the CLI) and the lab only parse arguments and call these:
- ``naming``: run folder names, finished-run checks (``finished_result``, ``finished_run_differences``)
- ``loaders``: the one loader builder of every training run (``epoch_loaders``, ``train_loader``)
- ``teacher``: ``run_teacher``, ``run_teacher_import``, ``evaluate_bundle``
- ``student``: ``run_student``, ``open_cache``
- ``inputs``: what a stage checks before it writes anything
- ``reuse``: a rerun reuses finished work or is refused naming what differs (``reusable_student``, ``reusable_teacher``)
"""

from attnfd_pipeline.runs.inputs import check_dataset_inputs, check_student_inputs, num_classes_of
from attnfd_pipeline.runs.loaders import epoch_loaders, student_dataset, train_loader, train_seeds
from attnfd_pipeline.runs.naming import (finished_result, finished_run_differences, run_name, run_variant, seed_order,
                                         storage_tag, student_dir, variant_tag)
from attnfd_pipeline.runs.reuse import FinishedWorkError, forget_finished_student, reusable_student, reusable_teacher
from attnfd_pipeline.runs.student import model_spec, open_cache, run_student
from attnfd_pipeline.runs.teacher import evaluate_bundle, run_teacher, run_teacher_import

__all__ = [
    "FinishedWorkError", "check_dataset_inputs", "check_student_inputs", "epoch_loaders", "evaluate_bundle", "finished_result", "forget_finished_student",
    "finished_run_differences", "model_spec", "num_classes_of", "open_cache", "reusable_student", "reusable_teacher", "run_name", "run_student",
    "run_teacher", "run_teacher_import", "run_variant", "seed_order", "storage_tag", "student_dataset", "student_dir",
    "train_loader", "train_seeds", "variant_tag",
]
