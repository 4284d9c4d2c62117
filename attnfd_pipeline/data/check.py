"""Dataset sanity check: every listed file exists, decodes, has matching sizes and legal labels.

``check_dataset(info_or_name, root, splits) -> list[Problem]`` (empty list = all good);
``format_problems(problems) -> str`` for people.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np

from .datasets import DataError, DatasetInfo, SplitFiles, get_dataset_info, list_split

__all__ = ["Problem", "check_dataset", "check_split", "format_problems", "masks_without_images", "split_counts"]


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _fmt_values(values: Sequence[int], limit: int = 12) -> str:
    vals = [int(v) for v in values]
    shown = ", ".join(str(v) for v in vals[:limit])
    more = f", ... ({len(vals)} values)" if len(vals) > limit else ""
    return "{" + shown + more + "}"


def _fmt_valid(valid: np.ndarray) -> str:
    """Describe a bool (256,) set as '[0, 21) ∪ {255}' style text."""
    parts, i = [], 0
    while i < 256:
        if valid[i]:
            j = i
            while j + 1 < 256 and valid[j + 1]:
                j += 1
            parts.append("{" + str(i) + "}" if i == j else f"[{i}, {j + 1})")
            i = j + 1
        else:
            i += 1
    return " ∪ ".join(parts) if parts else "{}"


def _image_hw(img_path: str, decode: bool) -> tuple[int, int]:
    """(H, W) of an image: fully decoded, or from its header only (``decode=False``, ~100× cheaper)."""
    from .io import read_image

    if decode:
        return tuple(read_image(img_path).shape[1:])
    from PIL import Image

    try:
        with Image.open(img_path) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(img_path, f"cannot decode image {img_path}: {e}") from e
    return h, w


JPEG_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")
MASK_SUFFIXES = (".png", ".PNG")


def _missing_label(lbl_path: str) -> str:
    """Why a listed mask is not there; a JPEG of the same name is named: JPEG masks are refused."""
    stem = os.path.splitext(lbl_path)[0]
    jpeg = next((stem + s for s in JPEG_SUFFIXES if os.path.isfile(stem + s)), None)
    if jpeg is None:
        return "listed label file is missing"
    return (f"listed label file is missing, but {jpeg} is there: JPEG masks are refused — lossy compression "
            f"turns the pixels at class edges into values of other classes (or none); save masks as PNG")


def _check_sample(info: DatasetInfo, img_path: str, lbl_path: str, decode_images: bool = True) -> list[Problem]:
    from .io import read_label_raw

    problems: list[Problem] = []
    img_ok = os.path.isfile(img_path)
    lbl_ok = os.path.isfile(lbl_path)
    if not img_ok:
        problems.append(Problem(img_path, "listed image file is missing"))
    if not lbl_ok:
        problems.append(Problem(lbl_path, _missing_label(lbl_path)))
    image_hw = raw = None
    if img_ok:
        try:
            image_hw = _image_hw(img_path, decode_images)
        except DataError as e:
            problems.append(Problem(img_path, f"unreadable image: {e}"))
    if lbl_ok:
        try:
            raw = read_label_raw(lbl_path)
        except DataError as e:
            problems.append(Problem(lbl_path, f"unreadable label: {e}"))
    if image_hw is not None and raw is not None and image_hw != raw.shape:
        problems.append(
            Problem(
                lbl_path,
                f"size mismatch: label is {raw.shape[1]}x{raw.shape[0]}, image {img_path} is "
                f"{image_hw[1]}x{image_hw[0]} (width x height)",
            )
        )
    if raw is not None:
        present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        valid = info.valid_stored_values(lbl_path)
        bad = present[~valid[present]]
        if bad.size:
            raw_encoded = info.raw_to_train is not None and not info.is_train_id_file(lbl_path)
            what = "raw label values" if raw_encoded else "label values"
            extra = f" (the known raw ids of {info.name})" if raw_encoded else ""
            problems.append(Problem(lbl_path, f"{what} {_fmt_values(bad)} outside {_fmt_valid(valid)}{extra}"))
    return problems


def check_split(info_or_name: Union[str, DatasetInfo], files: SplitFiles, *, threads: int = 4,
                decode_images: bool = True) -> list[Problem]:
    """Check the samples of an already listed split (``decode_images=False``: images are only opened
    for their header — existence, format and size — labels are always decoded)."""
    info = get_dataset_info(info_or_name)
    if len(files) == 0:
        return [Problem(files.source, f"split {files.split!r} of {info.name} is empty")]
    n = len(files)

    def one(i: int) -> list[Problem]:
        return _check_sample(info, str(files.images[i]), str(files.labels[i]), decode_images)

    threads = max(1, min(int(threads), n))
    if threads == 1:
        results = [one(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(max_workers=threads) as ex:
            results = list(ex.map(one, range(n), chunksize=max(1, n // (threads * 16))))
    return [p for r in results for p in r]


def check_dataset(
    info_or_name: Union[str, DatasetInfo],
    root: Union[str, os.PathLike],
    splits: Union[str, Iterable[str], None] = None,
    *,
    threads: int = 4,
    decode_images: bool = True,
) -> list[Problem]:
    """All problems found in ``splits`` (default: the dataset's usual splits) of the dataset
    at ``root``: missing list file/folder, empty split, missing or unreadable files, image/label
    size mismatch, label values outside ``[0, C) ∪ {ignore}`` (raw-encoded datasets: outside
    their known raw ids). Decoding runs in ``threads`` threads; ``decode_images=False`` reads only the
    image headers (what a stage checks before it writes anything). ``[]`` means all good."""
    info = get_dataset_info(info_or_name)
    if splits is None:
        splits = info.splits
    elif isinstance(splits, str):
        splits = (splits,)
    problems: list[Problem] = []
    for split in splits:
        try:
            files = list_split(info, root, split)
        except DataError as e:
            problems.append(Problem(e.path, str(e)))
            continue
        problems.extend(check_split(info, files, threads=threads, decode_images=decode_images))
    return problems


def masks_without_images(info_or_name: Union[str, DatasetInfo], root: Union[str, os.PathLike],
                         splits: Iterable[str]) -> list[str]:
    """PNG masks in the folders the splits' masks are read from that belong to no listed image of any of
    ``splits`` (an image deleted or renamed, a typo): not an error — nothing reads them — but worth a look."""
    info = get_dataset_info(info_or_name)
    listed: set[str] = set()
    folders: set[str] = set()
    for split in splits:
        try:
            files = list_split(info, root, split)
        except DataError:
            continue  # check_dataset reports it
        listed.update(os.path.abspath(p) for p in files.labels)
        folders.update(os.path.dirname(os.path.abspath(p)) for p in files.labels)
    return sorted(os.path.join(d, n) for d in folders for n in os.listdir(d)
                  if n.endswith(MASK_SUFFIXES) and os.path.join(d, n) not in listed)


def split_counts(info_or_name: Union[str, DatasetInfo], root: Union[str, os.PathLike],
                 splits: Iterable[str]) -> dict[str, int]:
    """Images listed in each split (a split that cannot be listed is left out: check_dataset reports it)."""
    info = get_dataset_info(info_or_name)
    out = {}
    for split in splits:
        try:
            out[split] = len(list_split(info, root, split))
        except DataError:
            continue
    return out


def format_problems(problems: Sequence[Problem], limit: int = 50) -> str:
    if not problems:
        return "no problems found"
    n = len(problems)
    lines = [f"{n} problem{'s' if n != 1 else ''} found:"]
    lines += [f"  {p.path}: {p.message}" for p in problems[:limit]]
    if n > limit:
        lines.append(f"  ... and {n - limit} more")
    return "\n".join(lines)
