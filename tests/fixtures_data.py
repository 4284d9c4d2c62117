"""Builders of tiny datasets in the exact public layouts (for the data-layer tests).

Each ``make_*`` writes 2-3 samples of 24x32 px under ``root`` and returns a dict
``{"root": Path, "split": str, "raw": {id: raw label array}}``. Label maps are vertical
stripes of chosen raw values so tests can check the mapping at known columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from attnfd_pipeline.data.io import write_jpeg, write_palette_png
from attnfd_pipeline.data.datasets import voc_colormap

H, W = 24, 32


def stripes(values, h: int = H, w: int = W, shift: int = 0) -> np.ndarray:
    """(h, w) uint8 with len(values) vertical stripes; value k covers columns
    [k * w // n, (k + 1) * w // n) (rolled by ``shift`` stripes)."""
    vals = list(values)
    vals = vals[shift % len(vals):] + vals[: shift % len(vals)]
    n = len(vals)
    out = np.zeros((h, w), dtype=np.uint8)
    for k, v in enumerate(vals):
        out[:, k * w // n : (k + 1) * w // n] = v
    return out


def stripe_column(values, value, w: int = W, shift: int = 0) -> int:
    """A column inside the stripe holding ``value``."""
    vals = list(values)
    vals = vals[shift % len(vals):] + vals[: shift % len(vals)]
    k = vals.index(value)
    return (k * w // len(vals) + (k + 1) * w // len(vals)) // 2


def image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)


def write_png_rgb(path, chw: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))).save(path)


def write_gray_png(path, arr: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8))).save(path)  # mode "L"


def write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in lines))


VOC_VALUES = (0, 5, 20, 255)


def make_voc(root: Path, n: int = 3) -> dict:
    """VOC: JPEGImages/*.jpg, palette SegmentationClass/*.png, ImageSets/Segmentation/*.txt.
    train = first n-1 ids, val = last id."""
    root = Path(root)
    ids = [f"2007_{i:06d}" for i in range(n)]
    raw = {}
    for i, sid in enumerate(ids):
        write_jpeg(root / "JPEGImages" / f"{sid}.jpg", image(i))
        raw[sid] = stripes(VOC_VALUES, shift=i)
        write_palette_png(root / "SegmentationClass" / f"{sid}.png", raw[sid], voc_colormap(256))
    write_lines(root / "ImageSets/Segmentation/train.txt", reversed(ids[:-1]))  # unsorted on purpose
    write_lines(root / "ImageSets/Segmentation/val.txt", ids[-1:])
    return {"root": root, "split": "train", "ids": ids[:-1], "raw": raw, "values": VOC_VALUES}


def make_voc_aug(root: Path) -> dict:
    """SBD-augmented VOC: SegmentationClassAug (grayscale) + train_aug.txt in the DeepLab
    two-column format; val uses SegmentationClass + val.txt."""
    root = Path(root)
    ids = ["2007_000032", "2008_000002", "2011_003276"]
    raw = {}
    for i, sid in enumerate(ids):
        write_jpeg(root / "JPEGImages" / f"{sid}.jpg", image(10 + i))
        raw[sid] = stripes(VOC_VALUES, shift=i)
        write_gray_png(root / "SegmentationClassAug" / f"{sid}.png", raw[sid])
    write_palette_png(root / "SegmentationClass" / f"{ids[2]}.png", raw[ids[2]], voc_colormap(21))
    write_lines(
        root / "ImageSets/Segmentation/train_aug.txt",
        [f"/JPEGImages/{ids[0]}.jpg /SegmentationClassAug/{ids[0]}.png", ids[1]],
    )
    write_lines(root / "ImageSets/Segmentation/val.txt", [ids[2]])
    return {"root": root, "split": "train_aug", "ids": ids[:2], "raw": raw, "values": VOC_VALUES}


CITYSCAPES_VALUES = (0, 7, 26, 33, 24, 1)


def make_cityscapes(root: Path, split: str = "train") -> dict:
    root = Path(root)
    stems = [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"), ("bochum", "bochum_000000_000313")]
    raw, ids = {}, []
    for i, (city, stem) in enumerate(stems):
        write_png_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image(20 + i))
        sid = f"{city}/{stem}"
        raw[sid] = stripes(CITYSCAPES_VALUES, shift=i)
        write_gray_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", raw[sid])
        # files the loader must ignore
        write_gray_png(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", raw[sid])
        ids.append(sid)
    return {"root": root, "split": split, "ids": ids, "raw": raw, "values": CITYSCAPES_VALUES}


CAMVID_VALUES = (0, 3, 10, 11)


def make_camvid(root: Path, split: str = "train") -> dict:
    root = Path(root)
    ids = ["0001TP_006690", "0001TP_006720", "Seq05VD_f00000"]
    raw = {}
    for i, sid in enumerate(ids):
        write_png_rgb(root / split / f"{sid}.png", image(30 + i))
        raw[sid] = stripes(CAMVID_VALUES, shift=i)
        write_gray_png(root / f"{split}annot" / f"{sid}.png", raw[sid])
    return {"root": root, "split": split, "ids": ids, "raw": raw, "values": CAMVID_VALUES}


ADE_VALUES = (0, 1, 150, 75)


def make_ade20k(root: Path, split: str = "training") -> dict:
    root = Path(root)
    prefix = "ADE_train" if split == "training" else "ADE_val"
    ids = [f"{prefix}_{i:08d}" for i in (1, 2, 17)]
    raw = {}
    for i, sid in enumerate(ids):
        write_jpeg(root / "images" / split / f"{sid}.jpg", image(40 + i))
        raw[sid] = stripes(ADE_VALUES, shift=i)
        write_gray_png(root / "annotations" / split / f"{sid}.png", raw[sid])
    return {"root": root, "split": split, "ids": ids, "raw": raw, "values": ADE_VALUES}


COCO_RAW_VALUES = (0, 12, 91, 181, 255, 11)  # 11 is an unused thing id -> ignore
COCO_TRAINID_VALUES = (0, 11, 170, 255)


def make_coco_stuff(root: Path, split: str = "val2017", train_ids: bool = False) -> dict:
    root = Path(root)
    ids = ["000000000139", "000000000285", "000000000632"]
    raw = {}
    values = COCO_TRAINID_VALUES if train_ids else COCO_RAW_VALUES
    for i, sid in enumerate(ids):
        write_jpeg(root / "images" / split / f"{sid}.jpg", image(50 + i))
        raw[sid] = stripes(values, shift=i)
        if train_ids:
            write_gray_png(root / "annotations" / split / f"{sid}_labelTrainIds.png", raw[sid])
            # the raw file next to it holds different values; the loader must prefer the train ids
            write_gray_png(root / "annotations" / split / f"{sid}.png", np.full((H, W), 181, np.uint8))
        else:
            write_gray_png(root / "annotations" / split / f"{sid}.png", raw[sid])
    return {"root": root, "split": split, "ids": ids, "raw": raw, "values": values}


BUILDERS = {
    "voc": make_voc,
    "voc_aug": make_voc_aug,
    "cityscapes": make_cityscapes,
    "camvid": make_camvid,
    "ade20k": make_ade20k,
    "coco_stuff": make_coco_stuff,
}
