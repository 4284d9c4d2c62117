import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from attnfd_pipeline.data import (
    DataError,
    get_dataset_info,
    list_datasets,
    list_split,
    load_pair,
    read_image,
    read_label,
)

try:
    from fixtures_data import BUILDERS, H, W, make_coco_stuff, make_voc, stripe_column, write_gray_png
except ImportError:  # tests/ imported as a package
    from tests.fixtures_data import BUILDERS, H, W, make_coco_stuff, make_voc, stripe_column, write_gray_png

# raw stored value -> expected train id, written out by hand (not taken from the code under test)
EXPECTED = {
    "voc": {0: 0, 5: 5, 20: 20, 255: 255},
    "voc_aug": {0: 0, 5: 5, 20: 20, 255: 255},
    "cityscapes": {0: 255, 1: 255, 7: 0, 24: 11, 26: 13, 33: 18},
    "camvid": {0: 0, 3: 3, 10: 10, 11: 255},
    "ade20k": {0: 255, 1: 0, 75: 74, 150: 149},
    "coco_stuff": {0: 0, 11: 255, 12: 11, 91: 80, 181: 170, 255: 255},
}


def test_registry_lists_all_and_rejects_unknown():
    names = list_datasets()
    for n in ("voc", "voc_aug", "cityscapes", "camvid", "ade20k", "coco_stuff", "demo"):
        assert n in names
    with pytest.raises(ValueError, match="known datasets: .*cityscapes"):
        get_dataset_info("pascal")


def test_dataset_infos_are_consistent():
    expect = {"voc": 21, "voc_aug": 21, "cityscapes": 19, "camvid": 11, "ade20k": 150, "coco_stuff": 171, "demo": 11}
    for name, c in expect.items():
        info = get_dataset_info(name)
        assert info.num_classes == c == len(info.class_names) == len(info.palette)
        lut = info.label_lut()
        assert lut.dtype == np.uint8 and lut.shape == (256,)
        assert lut[255] == 255
        # every class is reachable from exactly one raw value (identity datasets: itself)
        targets = lut[info.valid_stored_values()]
        assert sorted(set(targets.tolist()) - {255}) == list(range(c))
    voc = get_dataset_info("voc")
    assert voc.palette[:3] == ((0, 0, 0), (128, 0, 0), (0, 128, 0)) and voc.palette[20] == (0, 64, 128)
    assert tuple(voc.palette_array()[255]) == (224, 224, 192)
    assert get_dataset_info("cityscapes").palette[0] == (128, 64, 128)
    assert get_dataset_info("ade20k").class_names[:3] == ("wall", "building", "sky")
    assert get_dataset_info("coco_stuff").class_names[170] == "wood"
    assert int((get_dataset_info("cityscapes").label_lut() != 255).sum()) == 19


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_layout_lists_and_maps(tmp_path, name):
    fx = BUILDERS[name](tmp_path / name)
    files = list_split(name, fx["root"], fx["split"])
    assert list(files.ids) == sorted(fx["ids"])
    assert files.ids.dtype.kind == files.images.dtype.kind == files.labels.dtype.kind == "U"
    assert len(files) == len(fx["ids"])
    lut = EXPECTED[name]
    for i, sid in enumerate(files.ids):
        img, lbl = load_pair(name, files, i)
        assert img.dtype == torch.uint8 and img.shape == (3, H, W)
        assert lbl.dtype == torch.uint8 and lbl.shape == (H, W)
        raw = fx["raw"][str(sid)]
        expected = np.vectorize(lut.__getitem__)(raw).astype(np.uint8)
        assert np.array_equal(lbl.numpy(), expected), (name, sid)


def test_spot_checks_cityscapes_ade_camvid_coco(tmp_path):
    cs = BUILDERS["cityscapes"](tmp_path / "cs")
    files = list_split("cityscapes", cs["root"], "train")
    assert files.ids[0] == "aachen/aachen_000000_000019"
    assert files.images[0].endswith("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png")
    assert files.labels[0].endswith("gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png")
    _, lbl = load_pair("cityscapes", files, 0)
    vals = cs["values"]
    assert int(lbl[0, stripe_column(vals, 7)]) == 0
    assert int(lbl[5, stripe_column(vals, 26)]) == 13
    assert int(lbl[5, stripe_column(vals, 0)]) == 255

    ade = BUILDERS["ade20k"](tmp_path / "ade")
    files = list_split("ade20k", ade["root"], "train")  # alias of "training"
    assert files.split == "training" and len(files) == 3
    _, lbl = load_pair("ade20k", files, 0)
    assert int(lbl[0, stripe_column(ade["values"], 0)]) == 255
    assert int(lbl[0, stripe_column(ade["values"], 1)]) == 0
    assert int(lbl[0, stripe_column(ade["values"], 150)]) == 149

    cv = BUILDERS["camvid"](tmp_path / "camvid", split="val")
    files = list_split("camvid", cv["root"], "val")
    _, lbl = load_pair("camvid", files, 0)
    assert int(lbl[0, stripe_column(cv["values"], 11)]) == 255
    assert int(lbl[0, stripe_column(cv["values"], 10)]) == 10

    coco = make_coco_stuff(tmp_path / "coco", split="val2017")
    files = list_split("coco_stuff", coco["root"], "val")  # alias of "val2017"
    _, lbl = load_pair("coco_stuff", files, 0)
    col = lambda v: stripe_column(coco["values"], v)  # noqa: E731
    assert [int(lbl[0, col(v)]) for v in (0, 12, 91, 181, 255, 11)] == [0, 11, 80, 170, 255, 255]


def test_coco_stuff_prefers_label_train_ids(tmp_path):
    fx = make_coco_stuff(tmp_path / "coco", split="train2017", train_ids=True)
    files = list_split("coco_stuff", fx["root"], "train")
    assert all(p.endswith("_labelTrainIds.png") for p in files.labels)
    assert len(files) == 3  # the raw *.png next to them are not extra samples
    for i, sid in enumerate(files.ids):
        _, lbl = load_pair("coco_stuff", files, i)
        assert np.array_equal(lbl.numpy(), fx["raw"][str(sid)])  # identity: already train ids


def test_voc_aug_val_uses_segmentation_class(tmp_path):
    fx = BUILDERS["voc_aug"](tmp_path / "aug")
    tr = list_split("voc_aug", fx["root"], "train_aug")
    assert all("SegmentationClassAug" in p for p in tr.labels)
    va = list_split("voc_aug", fx["root"], "val")
    assert len(va) == 1 and va.labels[0].endswith("SegmentationClass/2011_003276.png")
    img, lbl = load_pair("voc_aug", va, 0)
    assert lbl.shape == img.shape[1:]


def test_missing_list_file_and_folders_name_the_path(tmp_path):
    fx = make_voc(tmp_path / "voc")
    with pytest.raises(DataError) as ei:
        list_split("voc", fx["root"], "trainval")
    assert ei.value.path.endswith("ImageSets/Segmentation/trainval.txt")
    assert "trainval.txt" in str(ei.value)

    with pytest.raises(DataError) as ei:
        list_split("voc", tmp_path / "nowhere", "train")
    assert ei.value.path == str(tmp_path / "nowhere") and str(tmp_path / "nowhere") in str(ei.value)

    BUILDERS["camvid"](tmp_path / "camvid")
    with pytest.raises(DataError) as ei:
        list_split("camvid", tmp_path / "camvid", "test")
    assert ei.value.path == str(tmp_path / "camvid" / "test") and "test" in str(ei.value)


def test_missing_image_raises_dataerror_naming_it(tmp_path):
    fx = make_voc(tmp_path / "voc")
    files = list_split("voc", fx["root"], "train")
    missing = files.images[1]
    (tmp_path / "voc" / "JPEGImages" / f"{files.ids[1]}.jpg").unlink()
    with pytest.raises(DataError) as ei:
        load_pair("voc", files, 1)
    assert ei.value.path == missing and missing in str(ei.value)
    # survives pickling (DataLoader workers, process pools) with its path
    err = pickle.loads(pickle.dumps(ei.value))
    assert isinstance(err, DataError) and err.path == missing


def test_size_mismatch_names_both_files(tmp_path):
    fx = make_voc(tmp_path / "voc")
    files = list_split("voc", fx["root"], "train")
    write_gray_png(tmp_path / "voc" / "SegmentationClass" / f"{files.ids[0]}.png", np.zeros((H + 1, W), np.uint8))
    with pytest.raises(DataError) as ei:
        load_pair("voc", files, 0)
    assert files.images[0] in str(ei.value) and files.labels[0] in str(ei.value)


def test_read_image_conversions_and_errors(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    a = read_image(tmp_path / "rgba.png")
    assert a.shape == (3, H, W) and torch.equal(a, torch.from_numpy(rgb).permute(2, 0, 1))
    g = read_image(tmp_path / "gray.png")
    assert g.shape == (3, H, W) and torch.equal(g[0], g[2])
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as ei:
        read_image(tmp_path / "bad.jpg")
    assert ei.value.path == str(tmp_path / "bad.jpg")


def test_colour_encoded_label_is_rejected(tmp_path):
    p = tmp_path / "rgb_label.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(p)
    with pytest.raises(DataError) as ei:
        read_label(p, "voc")
    assert ei.value.path == str(p) and "RGB" in str(ei.value)
