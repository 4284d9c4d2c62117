import numpy as np

from attnfd_pipeline.data import Problem, check_dataset, format_problems, list_split

try:
    from fixtures_data import BUILDERS, H, W, make_coco_stuff, make_voc, stripes, write_gray_png
except ImportError:  # tests/ imported as a package
    from tests.fixtures_data import BUILDERS, H, W, make_coco_stuff, make_voc, stripes, write_gray_png


def test_good_datasets_have_no_problems(tmp_path):
    for name, build in sorted(BUILDERS.items()):
        fx = build(tmp_path / name)
        assert check_dataset(name, fx["root"], [fx["split"]]) == [], name
    fx = make_voc(tmp_path / "voc2")
    assert check_dataset("voc", fx["root"], ["train", "val"]) == []
    assert format_problems([]) == "no problems found"


def test_missing_file_and_unreadable_image(tmp_path):
    fx = make_voc(tmp_path / "voc", n=5)
    files = list_split("voc", fx["root"], "train")
    # missing label, garbage image, truncated image, corrupt label
    (tmp_path / "voc" / "SegmentationClass" / f"{files.ids[0]}.png").unlink()
    with open(files.labels[3], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    with open(files.images[1], "wb") as f:
        f.write(b"\xff\xd8 garbage")
    data = open(files.images[2], "rb").read()
    with open(files.images[2], "wb") as f:
        f.write(data[: len(data) // 2])
    problems = check_dataset("voc", fx["root"], "train")
    by_path = {p.path: p.message for p in problems}
    assert len(problems) == 4, format_problems(problems)
    assert "missing" in by_path[files.labels[0]]
    assert "unreadable image" in by_path[files.images[1]]
    assert "unreadable image" in by_path[files.images[2]]
    assert "unreadable label" in by_path[files.labels[3]]
    text = format_problems(problems)
    assert text.startswith("4 problems found:") and files.images[1] in text
    assert format_problems(problems, limit=1).endswith("... and 3 more")


def test_size_mismatch_and_bad_values(tmp_path):
    fx = make_voc(tmp_path / "voc", n=3)
    files = list_split("voc", fx["root"], "train")
    write_gray_png(tmp_path / "voc" / "SegmentationClass" / f"{files.ids[0]}.png", np.zeros((H, W + 4), np.uint8))
    write_gray_png(tmp_path / "voc" / "SegmentationClass" / f"{files.ids[1]}.png", stripes((0, 23, 40, 255)))
    problems = check_dataset("voc", fx["root"], ["train"])
    assert [p.path for p in problems] == [files.labels[0], files.labels[1]]
    assert "size mismatch" in problems[0].message and files.images[0] in problems[0].message
    assert problems[1].message == "label values {23, 40} outside [0, 21) ∪ {255}"


def test_raw_values_checked_against_known_raw_ids(tmp_path):
    # Cityscapes maps unknown raw ids to 255, but a raw 40 is still reported
    fx = BUILDERS["cityscapes"](tmp_path / "cs")
    files = list_split("cityscapes", fx["root"], "train")
    write_gray_png(tmp_path / "cs" / "gtFine" / "train" / (files.ids[2] + "_gtFine_labelIds.png"), stripes((7, 40, 255)))
    problems = check_dataset("cityscapes", fx["root"], "train")
    assert problems == [Problem(files.labels[2], problems[0].message)]
    assert problems[0].message.startswith("raw label values {40} outside [0, 34) ∪ {255}")
    # COCO-Stuff raw: 182..254 unknown; train-id files: >= 171 (except 255) illegal
    fx = make_coco_stuff(tmp_path / "coco")
    files = list_split("coco_stuff", fx["root"], "val2017")
    write_gray_png(files.labels[0], stripes((181, 200)))
    assert [p.path for p in check_dataset("coco_stuff", fx["root"], "val")] == [files.labels[0]]
    fx = make_coco_stuff(tmp_path / "coco_tid", train_ids=True)
    files = list_split("coco_stuff", fx["root"], "val2017")
    write_gray_png(files.labels[1], stripes((170, 181)))
    problems = check_dataset("coco_stuff", fx["root"], "val")
    assert [p.path for p in problems] == [files.labels[1]]
    assert problems[0].message == "label values {181} outside [0, 171) ∪ {255}"


def test_empty_split_and_missing_list_file(tmp_path):
    fx = make_voc(tmp_path / "voc")
    lst = tmp_path / "voc" / "ImageSets" / "Segmentation" / "val.txt"
    lst.write_text("\n")
    problems = check_dataset("voc", fx["root"], ["val", "trainval"])
    assert [p.path for p in problems] == [str(lst), str(lst.with_name("trainval.txt"))]
    assert "empty" in problems[0].message
    assert "not found" in problems[1].message
