"""Dataset definitions as data: classes, palettes, label encodings and file layouts.

Every supported dataset is one :class:`DatasetInfo` in a registry (``get_dataset_info`` /
``list_datasets``). An info says

* which classes exist (names, one RGB palette colour each, the ignore index),
* how a stored label value maps to a train id (``label_lut()``, a 256-entry uint8 table),
* where the files of a split live under the folder the user points at (:class:`Layout`).

``list_split`` turns (dataset, root, split) into a :class:`SplitFiles` made of numpy string
arrays only (no Python lists of objects, which grow DataLoader worker memory through
copy-on-write of reference counts).

This module imports numpy only; torch is imported lazily by :mod:`attnfd_pipeline.data.io`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

import numpy as np
from attnfd_pipeline.errors import UserError

__all__ = [
    "DataError",
    "Layout",
    "DatasetInfo",
    "SplitFiles",
    "register_dataset",
    "get_dataset_info",
    "list_datasets",
    "list_split",
    "voc_colormap",
    "CUSTOM",
    "declared_dataset",
    "dataset_info",
    "class_names",
    "dataset_palette",
    "label_identity",
]

IGNORE_INDEX = 255


class DataError(Exception):
    """A problem with a dataset file or folder. ``.path`` is the offending path; the message
    always names it."""

    def __init__(self, path: Union[str, os.PathLike], message: str | None = None):
        self.path = os.fspath(path)
        if message is None:
            message = self.path
        elif self.path not in message:
            message = f"{message} [{self.path}]"
        self.message = message
        super().__init__(message)

    def __reduce__(self):  # keep .path across pickling (DataLoader workers, process pools)
        return (type(self), (self.path, self.message))


# --------------------------------------------------------------------------------------------
# Palettes
# --------------------------------------------------------------------------------------------


def voc_colormap(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The standard Pascal VOC colormap (bitwise generator); index 255 is (224, 224, 192)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Layout and dataset description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the files of a split are, relative to the dataset root.

    ``image_dir``/``label_dir``/``list_file`` may contain ``{split}``. A sample id maps to
    ``image_dir/{id}{image_suffix}`` and ``label_dir/{id}{label_suffix}``.

    * ``list_file`` set: the split is the ids listed in that file (one per line; a line like
      ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` is read as id ``x``).
    * ``list_file`` None: the split is every ``*{image_suffix}`` file in ``image_dir``
      (and, with ``recursive``, in its direct sub-folders, id ``sub/stem``).
    * ``train_ids_suffix``: alternative label files already holding train ids
      (e.g. COCO-Stuff ``*_labelTrainIds.png``); used for a split when any exist.
    * ``by_stem`` (the ``folders`` layout of declared datasets): images of any common image
      extension, paired with their label by file stem (``image_suffix`` is unused). The split is
      every image in ``image_dir``; when that folder does not exist, the ids in ``list_file`` with
      images and labels in the ``{split}``-less parents of ``image_dir`` / ``label_dir``.
    """

    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    list_file: str | None = None
    recursive: bool = False
    train_ids_suffix: str | None = None
    by_stem: bool = False


@functools.lru_cache(maxsize=None)
def _make_lut(raw_to_train: tuple[int, ...] | None) -> np.ndarray:
    if raw_to_train is None:
        lut = np.arange(256, dtype=np.uint8)
    else:
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[: len(raw_to_train)] = np.asarray(raw_to_train, dtype=np.uint8)
    lut.setflags(write=False)
    return lut


@functools.lru_cache(maxsize=None)
def _make_valid_raw(raw_to_train: tuple[int, ...] | None, num_classes: int, ignore_index: int,
                    known_raw: tuple[int, ...] | None = None) -> np.ndarray:
    valid = np.zeros(256, dtype=bool)
    if known_raw is not None:
        valid[list(known_raw)] = True
    else:
        valid[: num_classes if raw_to_train is None else len(raw_to_train)] = True
    valid[ignore_index] = True
    valid.setflags(write=False)
    return valid


@dataclass(frozen=True)
class DatasetInfo:
    """Everything the pipeline needs to know about one dataset, as data.

    ``raw_to_train``: ``raw_to_train[r]`` is the train id (or ``ignore_index``) of stored label
    value ``r``; raw values at or past its end map to ``ignore_index``. ``None`` means the stored
    values already are train ids (identity table, so an out-of-range value stays visible).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    layout: Layout = field(default=None)  # type: ignore[assignment]
    split_layouts: tuple[tuple[str, Layout], ...] = ()
    split_aliases: tuple[tuple[str, str], ...] = ()
    splits: tuple[str, ...] = ()
    raw_to_train: tuple[int, ...] | None = None
    description: str = ""
    # the legal stored values of a raw-encoded label file, when not simply [0, len(raw_to_train)): a declared
    # label_map is the whole table, so a value between its keys is an error rather than silently ignored
    known_raw: tuple[int, ...] | None = None

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise UserError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        if len(self.palette) != self.num_classes:
            raise UserError(f"{self.name}: {len(self.palette)} palette colours for {self.num_classes} classes")
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in self.palette):
            raise UserError(f"{self.name}: palette entries must be RGB triples in 0..255")
        if not (self.num_classes <= self.ignore_index <= 255):
            raise UserError(f"{self.name}: ignore_index {self.ignore_index} must be in [num_classes, 255]")
        if self.layout is None:
            raise UserError(f"{self.name}: a layout is required")
        if self.raw_to_train is not None:
            if len(self.raw_to_train) > 256:
                raise UserError(f"{self.name}: raw_to_train longer than 256")
            bad = {t for t in self.raw_to_train if not (0 <= t < self.num_classes or t == self.ignore_index)}
            if bad:
                raise UserError(f"{self.name}: raw_to_train has targets {sorted(bad)} outside the classes")

    # -- label encoding ---------------------------------------------------------------------

    def label_lut(self) -> np.ndarray:
        """uint8 (256,) table: stored raw label value -> train id (or ignore_index). Read-only."""
        return _make_lut(self.raw_to_train)

    def is_train_id_file(self, label_path: Union[str, os.PathLike]) -> bool:
        """True when ``label_path`` is an alternative label file already holding train ids."""
        p = os.fspath(label_path)
        for lay in self._all_layouts():
            if lay.train_ids_suffix and p.endswith(lay.train_ids_suffix):
                return True
        return False

    def lut_for(self, label_path: Union[str, os.PathLike]) -> np.ndarray:
        """The table to apply to the stored values of this particular label file."""
        return _make_lut(None) if self.is_train_id_file(label_path) else self.label_lut()

    def valid_stored_values(self, label_path: Union[str, os.PathLike] | None = None) -> np.ndarray:
        """bool (256,): which stored values are legal in a label file of this dataset.

        Train-id encoded files (and identity datasets): ``[0, C) ∪ {ignore}``. Raw-encoded
        files: the known raw ids ``[0, len(raw_to_train)) ∪ {ignore}``, so an unknown raw value
        is still caught although the table maps it to ignore."""
        if label_path is not None and self.is_train_id_file(label_path):
            return _make_valid_raw(None, self.num_classes, self.ignore_index)
        return _make_valid_raw(self.raw_to_train, self.num_classes, self.ignore_index, self.known_raw)

    def palette_array(self) -> np.ndarray:
        """uint8 (256, 3): class colours, then the VOC colormap for the remaining indices."""
        full = np.asarray(voc_colormap(256), dtype=np.uint8)
        full[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return full

    # -- splits ------------------------------------------------------------------------------

    def canonical_split(self, split: str) -> str:
        return dict(self.split_aliases).get(split, split)

    def layout_for(self, split: str) -> Layout:
        return dict(self.split_layouts).get(self.canonical_split(split), self.layout)

    def _all_layouts(self) -> Iterable[Layout]:
        yield self.layout
        for _, lay in self.split_layouts:
            yield lay


@dataclass(frozen=True, eq=False)
class SplitFiles:
    """The files of one split: parallel numpy arrays of str (sorted by id).

    ``source`` is the list file or image folder the split was read from."""

    dataset: str
    root: str
    split: str
    source: str
    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __repr__(self) -> str:
        return f"SplitFiles(dataset={self.dataset!r}, split={self.split!r}, n={len(self)}, root={self.root!r})"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo, *, overwrite: bool = False) -> DatasetInfo:
    if not overwrite and info.name in _REGISTRY and _REGISTRY[info.name] != info:
        raise UserError(f"dataset {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset_info(name: Union[str, DatasetInfo]) -> DatasetInfo:
    if isinstance(name, DatasetInfo):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_REGISTRY))}") from None


# --------------------------------------------------------------------------------------------
# Listing a split
# --------------------------------------------------------------------------------------------


def _list_words(path: Path) -> list[str]:
    """The first word of each line of a split list file (blank lines and ``#`` comments skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(path, f"cannot read split list file {path}: {e.strerror or e}") from e
    return [line.split()[0] for line in (raw.strip() for raw in text.splitlines())
            if line and not line.startswith("#")]


def _read_list_file(path: Path, image_suffix: str) -> list[str]:
    ids = []
    for tok in _list_words(path):
        if "/" in tok or tok.endswith(image_suffix):
            tok = tok.rsplit("/", 1)[-1]
            if tok.endswith(image_suffix):
                tok = tok[: -len(image_suffix)]
            else:
                tok = os.path.splitext(tok)[0]
        ids.append(tok)
    return ids


def _scan(folder: Path, suffix: str, recursive: bool) -> list[str]:
    """ids (relative path without suffix, '/'-separated) of the files ending with suffix."""
    ids = []
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(folder, f"cannot list folder {folder}: {e.strerror or e}") from e
    for e in entries:
        if e.name.startswith("."):
            continue
        if recursive and e.is_dir():
            ids.extend(f"{e.name}/{s}" for s in _scan(Path(e.path), suffix, False))
        elif not recursive and e.name.endswith(suffix) and e.is_file():
            ids.append(e.name[: -len(suffix)])
    return ids


def _any_with_suffix(folder: Path, suffix: str, recursive: bool) -> bool:
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.endswith(suffix) and not e.name.startswith("."):
                    return True
                if recursive and e.is_dir() and _any_with_suffix(Path(e.path), suffix, False):
                    return True
    except OSError:
        return False
    return False


def list_split(info_or_name: Union[str, DatasetInfo], root: Union[str, os.PathLike], split: str) -> SplitFiles:
    """List the (image, label) files of ``split`` of the dataset at ``root``.

    Ids are sorted and de-duplicated. Files are not opened or stat-ed one by one here (use
    :func:`attnfd_pipeline.data.check.check_dataset`); a missing root, list file or folder
    raises :class:`DataError` naming it."""
    info = get_dataset_info(info_or_name)
    root_p = Path(root).expanduser()
    if not root_p.is_dir():
        raise DataError(root_p, f"{info.name} dataset root {root_p} does not exist or is not a folder")
    split_c = info.canonical_split(split)
    lay = info.layout_for(split_c)
    if lay.by_stem:
        return _list_by_stem(info, root_p, split_c, lay)
    image_dir = root_p / lay.image_dir.format(split=split_c)
    label_dir = root_p / lay.label_dir.format(split=split_c)

    if lay.list_file:
        source = root_p / lay.list_file.format(split=split_c)
        if not source.is_file():
            known = f"; usual splits: {', '.join(info.splits)}" if info.splits else ""
            raise DataError(source, f"split list file {source} not found ({info.name}, split {split!r}{known})")
        ids = _read_list_file(source, lay.image_suffix)
    else:
        source = image_dir
        if not image_dir.is_dir():
            known = f"; usual splits: {', '.join(info.splits)}" if info.splits else ""
            raise DataError(image_dir, f"image folder {image_dir} not found ({info.name}, split {split!r}{known})")
        ids = _scan(image_dir, lay.image_suffix, lay.recursive)
    if not image_dir.is_dir():
        raise DataError(image_dir, f"image folder {image_dir} not found ({info.name}, split {split!r})")
    if not label_dir.is_dir():
        raise DataError(label_dir, f"label folder {label_dir} not found ({info.name}, split {split!r})")

    label_suffix = lay.label_suffix
    if lay.train_ids_suffix and _any_with_suffix(label_dir, lay.train_ids_suffix, lay.recursive):
        label_suffix = lay.train_ids_suffix

    ids = sorted(set(ids))
    img_prefix = str(image_dir) + os.sep
    lbl_prefix = str(label_dir) + os.sep
    ids_a = np.array(ids, dtype=str) if ids else np.array([], dtype="<U1")
    images = np.array([img_prefix + i.replace("/", os.sep) + lay.image_suffix for i in ids], dtype=str)
    labels = np.array([lbl_prefix + i.replace("/", os.sep) + label_suffix for i in ids], dtype=str)
    if not ids:
        images = np.array([], dtype="<U1")
        labels = np.array([], dtype="<U1")
    return SplitFiles(
        dataset=info.name, root=str(root_p), split=split_c, source=str(source), ids=ids_a, images=images, labels=labels
    )


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")  # lossless: a JPEG mask would blur its class ids


def _files_by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, str]:
    """stem -> file name of the files in ``folder`` with one of ``extensions`` (case-insensitive);
    two files with one stem are ambiguous and refused naming both."""
    out: dict[str, str] = {}
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if not e.name.startswith(".") and e.is_file())
    except OSError as e:
        raise DataError(folder, f"cannot list folder {folder}: {e.strerror or e}") from e
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() not in extensions:
            continue
        if stem in out:
            raise DataError(folder / name, f"{folder / out[stem]} and {folder / name} have the same stem {stem!r}: "
                                           f"cannot tell which one is sample {stem!r}")
        out[stem] = name
    return out


def _read_stem_list(path: Path) -> list[str]:
    """Sample ids of a split list file: the first word of each line, folder and image extension dropped
    (``a``, ``a.jpg`` and ``images/a.jpg`` all name sample ``a``)."""
    ids = []
    for word in _list_words(path):
        name = word.rsplit("/", 1)[-1]
        stem, ext = os.path.splitext(name)
        ids.append(stem if ext.lower() in IMAGE_EXTENSIONS else name)
    return ids


def _list_by_stem(info: DatasetInfo, root_p: Path, split: str, lay: Layout) -> SplitFiles:
    """The ``folders`` layout: ``images/<split>/`` + ``masks/<split>/`` paired by stem, or, without that
    image folder, the ids of a split list file over flat ``images/`` + ``masks/``."""
    image_dir = root_p / lay.image_dir.format(split=split)
    label_dir = root_p / lay.label_dir.format(split=split)
    list_file = root_p / lay.list_file.format(split=split) if lay.list_file else None
    if image_dir.is_dir():
        source = image_dir
        images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
        ids = sorted(images)
    elif list_file is not None and list_file.is_file():
        source = list_file
        image_dir = root_p / lay.image_dir.format(split="")
        label_dir = root_p / lay.label_dir.format(split="")
        if not image_dir.is_dir():
            raise DataError(image_dir, f"image folder {image_dir} not found ({info.name}, split {split!r} listed "
                                       f"in {list_file})")
        images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
        ids = sorted(set(_read_stem_list(list_file)))
    else:
        where = f"{image_dir}/" + (f" nor a split list file {list_file}" if list_file is not None else "")
        raise DataError(image_dir, f"split {split!r} of {info.name}: no image folder {where}")
    if not label_dir.is_dir():
        raise DataError(label_dir, f"label folder {label_dir} not found ({info.name}, split {split!r})")
    labels = _files_by_stem(label_dir, LABEL_EXTENSIONS)
    # an id without an image or a label keeps the expected path: the check then names the missing file
    img_paths = [str(image_dir / images.get(i, i + ".jpg")) for i in ids]
    lbl_paths = [str(label_dir / labels.get(i, i + ".png")) for i in ids]
    return SplitFiles(dataset=info.name, root=str(root_p), split=split, source=str(source),
                      ids=np.array(ids, dtype=str) if ids else np.array([], dtype="<U1"),
                      images=np.array(img_paths, dtype=str) if ids else np.array([], dtype="<U1"),
                      labels=np.array(lbl_paths, dtype=str) if ids else np.array([], dtype="<U1"))


# --------------------------------------------------------------------------------------------
# Built-in public datasets
# --------------------------------------------------------------------------------------------

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

VOC_LAYOUT = Layout(
    image_dir="JPEGImages",
    label_dir="SegmentationClass",
    image_suffix=".jpg",
    label_suffix=".png",
    list_file="ImageSets/Segmentation/{split}.txt",
)

VOC = register_dataset(
    DatasetInfo(
        name="voc",
        num_classes=21,
        class_names=VOC_CLASSES,
        palette=voc_colormap(21),
        layout=VOC_LAYOUT,
        splits=("train", "val", "trainval"),
        description="Pascal VOC 2012 segmentation (palette PNG, index = class, 255 = boundary/ignore)",
    )
)

VOC_AUG = register_dataset(
    DatasetInfo(
        name="voc_aug",
        num_classes=21,
        class_names=VOC_CLASSES,
        palette=voc_colormap(21),
        layout=Layout(
            image_dir="JPEGImages",
            label_dir="SegmentationClassAug",
            image_suffix=".jpg",
            label_suffix=".png",
            list_file="ImageSets/Segmentation/{split}.txt",
        ),
        split_layouts=(("val", VOC_LAYOUT),),
        splits=("train_aug", "val"),
        description="SBD-augmented VOC 2012 (SegmentationClassAug PNGs, train_aug = 10,582 images)",
    )
)

# The embedded procedural dataset (drawn by ``data.demo``); declared here with the other built-ins so that
# the registry knows it without importing the generator.
DEMO_CLASS_NAMES = (
    "background", "disc", "ring", "square", "triangle", "cross", "star", "bar", "crescent", "hexagon", "heart",
)  # fmt: skip
DEMO_PALETTE = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)  # fmt: skip
DEMO_INFO = register_dataset(
    DatasetInfo(
        name="demo",
        num_classes=len(DEMO_CLASS_NAMES),
        class_names=DEMO_CLASS_NAMES,
        palette=DEMO_PALETTE,
        layout=VOC_LAYOUT,
        splits=("train", "val"),  # data.demo seeds each image by its split's position here
        description="embedded procedural dataset (VOC layout): 10 shape+texture classes + background",
    )
)

# Cityscapes: label id -> train id (cityscapesscripts labels.py); ids 0..33, others ignore.
_CITYSCAPES_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                     26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip

CITYSCAPES = register_dataset(
    DatasetInfo(
        name="cityscapes",
        num_classes=19,
        class_names=(
            "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
            "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
        ),  # fmt: skip
        palette=(
            (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
            (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
            (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
        ),  # fmt: skip
        layout=Layout(
            image_dir="leftImg8bit/{split}",
            label_dir="gtFine/{split}",
            image_suffix="_leftImg8bit.png",
            label_suffix="_gtFine_labelIds.png",
            recursive=True,
        ),
        raw_to_train=tuple(_CITYSCAPES_TRAIN.get(i, IGNORE_INDEX) for i in range(34)),
        splits=("train", "val", "test"),
        description="Cityscapes gtFine (34 label ids -> 19 train ids, rest ignore)",
    )
)

CAMVID = register_dataset(
    DatasetInfo(
        name="camvid",
        num_classes=11,
        class_names=("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                     "Pedestrian", "Bicyclist"),  # fmt: skip
        palette=(
            (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
            (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
        ),  # fmt: skip
        layout=Layout(image_dir="{split}", label_dir="{split}annot", image_suffix=".png", label_suffix=".png"),
        raw_to_train=tuple(range(11)) + (IGNORE_INDEX,),  # 11 = void
        splits=("train", "val", "test"),
        description="CamVid, SegNet split (11 classes; raw 11 = void -> ignore)",
    )
)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip

ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip

ADE20K = register_dataset(
    DatasetInfo(
        name="ade20k",
        num_classes=150,
        class_names=ADE20K_CLASSES,
        palette=ADE20K_PALETTE,
        layout=Layout(
            image_dir="images/{split}",
            label_dir="annotations/{split}",
            image_suffix=".jpg",
            label_suffix=".png",
        ),
        split_aliases=(("train", "training"), ("val", "validation")),
        raw_to_train=(IGNORE_INDEX,) + tuple(range(150)),  # 0 = other -> ignore; 1..150 -> 0..149
        splits=("training", "validation"),
        description="ADE20K SceneParsing (ADEChallengeData2016): 0 -> ignore, 1..150 -> 0..149",
    )
)

COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge", "building-other",
    "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes",
    "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip

COCO_STUFF_PALETTE = (
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224), (0, 192, 192),
    (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192), (0, 0, 224), (0, 0, 64), (0, 160, 192),
    (128, 0, 96), (128, 0, 192), (0, 32, 192), (128, 128, 224), (0, 0, 192), (128, 160, 192), (128, 128, 0),
    (128, 0, 32), (128, 32, 0), (128, 0, 128), (64, 128, 32), (0, 160, 0), (0, 0, 0), (192, 128, 160),
    (0, 32, 0), (0, 128, 128), (64, 128, 160), (128, 160, 0), (0, 128, 0), (192, 128, 32), (128, 96, 128),
    (0, 0, 128), (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160), (0, 96, 128), (128, 128, 128),
    (64, 0, 160), (128, 224, 128), (128, 128, 64), (192, 0, 32), (128, 96, 0), (128, 0, 192), (0, 128, 32),
    (64, 224, 0), (0, 0, 64), (128, 128, 160), (64, 96, 0), (0, 128, 192), (0, 128, 160), (192, 224, 0),
    (0, 128, 64), (128, 128, 32), (192, 32, 128), (0, 64, 192), (0, 0, 32), (64, 160, 128), (128, 64, 64),
    (128, 0, 160), (64, 32, 128), (128, 192, 192), (0, 0, 160), (192, 160, 128), (128, 192, 0), (128, 0, 96),
    (192, 32, 0), (128, 64, 128), (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0),
    (0, 192, 128), (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128), (0, 64, 128),
    (64, 0, 96), (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128), (128, 192, 128), (64, 0, 224),
    (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (128, 64, 192), (0, 128, 96), (0, 224, 0),
    (64, 64, 64), (128, 128, 224), (0, 96, 0), (64, 192, 192), (0, 128, 224), (128, 224, 0), (64, 192, 64),
    (128, 128, 96), (128, 32, 128), (64, 0, 192), (0, 64, 96), (0, 160, 128), (192, 0, 64), (128, 64, 224),
    (0, 32, 128), (192, 128, 192), (0, 64, 224), (128, 160, 128), (192, 128, 0), (128, 64, 32), (128, 32, 64),
    (192, 0, 128), (64, 192, 32), (0, 160, 64), (64, 0, 0), (192, 192, 160), (0, 32, 64), (64, 128, 128),
    (64, 192, 160), (128, 160, 64), (64, 128, 0), (192, 192, 32), (128, 96, 192), (64, 0, 128), (64, 64, 32),
    (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192), (192, 128, 128), (64, 64, 160), (128, 224, 192),
    (192, 128, 64), (192, 64, 32), (128, 96, 64), (192, 0, 192), (0, 192, 32), (64, 224, 64), (64, 0, 64),
    (128, 192, 160), (64, 96, 64), (64, 128, 192), (0, 192, 160), (192, 224, 64), (64, 128, 64),
    (128, 192, 32), (192, 32, 192), (64, 64, 192), (0, 64, 32), (64, 160, 192), (192, 64, 64), (128, 64, 160),
    (64, 32, 192), (192, 192, 192), (0, 64, 160), (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64),
    (192, 64, 128), (64, 192, 96), (64, 160, 64), (64, 64, 0),
)  # fmt: skip

# COCO-Stuff-164K stored ids 0..181 (= COCO category id - 1); 11 thing ids are unused.
COCO_STUFF_UNUSED_RAW = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def _coco_stuff_raw_to_train() -> tuple[int, ...]:
    out, nxt = [], 0
    for raw in range(182):
        if raw in COCO_STUFF_UNUSED_RAW:
            out.append(IGNORE_INDEX)
        else:
            out.append(nxt)
            nxt += 1
    assert nxt == 171
    return tuple(out)


COCO_STUFF = register_dataset(
    DatasetInfo(
        name="coco_stuff",
        num_classes=171,
        class_names=COCO_STUFF_CLASSES,
        palette=COCO_STUFF_PALETTE,
        layout=Layout(
            image_dir="images/{split}",
            label_dir="annotations/{split}",
            image_suffix=".jpg",
            label_suffix=".png",
            train_ids_suffix="_labelTrainIds.png",
        ),
        split_aliases=(("train", "train2017"), ("val", "val2017")),
        raw_to_train=_coco_stuff_raw_to_train(),
        splits=("train2017", "val2017"),
        description="COCO-Stuff-164K: raw ids 0..181 (171 used) -> 0..170, 255 unlabeled; "
        "*_labelTrainIds.png used when present",
    )
)


# --------------------------------------------------------------------------------------------
# Datasets declared in a config ([data] dataset = "custom")
# --------------------------------------------------------------------------------------------

CUSTOM = "custom"

# images/<split>/* + masks/<split>/* paired by stem; without images/<split>/, splits/<split>.txt over flat folders
FOLDERS_LAYOUT = Layout(image_dir="images/{split}", label_dir="masks/{split}", image_suffix="", label_suffix=".png",
                        list_file="splits/{split}.txt", by_stem=True)
DECLARED_LAYOUTS = {"voc": VOC_LAYOUT, "folders": FOLDERS_LAYOUT}


def declared_dataset(classes: Iterable[str], *, palette: Iterable[Iterable[int]] = (), ignore_index: int = IGNORE_INDEX,
                     label_map: dict | None = None, layout: str = "voc") -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset declared as data (``[data] dataset = "custom"``).

    ``ignore_index`` is the *stored* value meaning "not labelled"; it becomes train id 255, the ignore id
    every stage uses. ``label_map`` (stored value -> train id, keys may be strings as TOML gives them) is
    the whole table: with it, only its keys and ``ignore_index`` are legal stored values. Without it,
    stored values are the train ids."""
    names = tuple(classes)
    n = len(names)
    if layout not in DECLARED_LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; known: {', '.join(DECLARED_LAYOUTS)}")
    raw_to_train = known = None
    if label_map or ignore_index != IGNORE_INDEX:
        table = {int(r): int(t) for r, t in label_map.items()} if label_map else {r: r for r in range(n)}
        table[int(ignore_index)] = IGNORE_INDEX
        raw_to_train = tuple(table.get(r, IGNORE_INDEX) for r in range(max(table) + 1))
        known = tuple(sorted(table))
    return DatasetInfo(
        name=CUSTOM,
        num_classes=n,
        class_names=names,
        palette=tuple(tuple(int(v) for v in c) for c in palette) or voc_colormap(n),
        layout=DECLARED_LAYOUTS[layout],
        raw_to_train=raw_to_train,
        known_raw=known,
        description=f"declared in the config: {n} classes, layout {layout!r}",
    )


def dataset_info(cfg) -> DatasetInfo:
    """The dataset of a config (a ``Config`` or its ``DataConfig``): the built-in named by ``data.dataset``,
    or the one its ``[data]`` table declares when that is ``"custom"``."""
    data = getattr(cfg, "data", cfg)
    if data.dataset != CUSTOM:
        return get_dataset_info(data.dataset)
    return declared_dataset(data.classes, palette=data.palette, ignore_index=data.ignore_index,
                            label_map=data.label_map, layout=data.layout)


def class_names(cfg) -> tuple[str, ...]:
    """Class names of a config's dataset; position = train id (what reports and predictions label)."""
    return dataset_info(cfg).class_names


def dataset_palette(cfg) -> np.ndarray:
    """uint8 (256, 3) colour of every train id of a config's dataset: its class colours, then the VOC
    colormap (so ignore, 255, is (224, 224, 192)); index it with a predicted or label map to draw it."""
    return dataset_info(cfg).palette_array()


def label_identity(info: DatasetInfo) -> dict:
    """What decides a declared dataset's train labels, for cache fingerprints: class names and label table.
    Built-ins give ``{}`` (their definition is fixed by their name, and their existing caches stay valid)."""
    if info.name != CUSTOM:
        return {}
    return {"classes": list(info.class_names),
            "raw_to_train": None if info.raw_to_train is None else list(info.raw_to_train),
            "known_raw": None if info.known_raw is None else list(info.known_raw)}
