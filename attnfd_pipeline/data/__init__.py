"""Data layer: dataset registry and layouts, image/label I/O, the embedded demo dataset, checks.

torch is not imported here (only on first image read), so processes that only generate or
list files start quickly.
"""

from .datasets import (
    DataError,
    DatasetInfo,
    Layout,
    SplitFiles,
    class_names,
    dataset_info,
    dataset_palette,
    declared_dataset,
    get_dataset_info,
    list_datasets,
    list_split,
    register_dataset,
    voc_colormap,
)
from .io import load_pair, read_image, read_label, read_label_raw, write_jpeg, write_palette_png
from .demo import DEMO_INFO, generate_demo, render_sample
from .check import Problem, check_dataset, check_split, format_problems

__all__ = [
    "DataError",
    "DatasetInfo",
    "Layout",
    "SplitFiles",
    "class_names",
    "dataset_info",
    "dataset_palette",
    "declared_dataset",
    "get_dataset_info",
    "list_datasets",
    "list_split",
    "register_dataset",
    "voc_colormap",
    "load_pair",
    "read_image",
    "read_label",
    "read_label_raw",
    "write_jpeg",
    "write_palette_png",
    "DEMO_INFO",
    "generate_demo",
    "render_sample",
    "Problem",
    "check_dataset",
    "check_split",
    "format_problems",
]
