"""Using a trained network: load any checkpoint kind as a plain eval model, evaluate it under a stated
protocol, segment images, export it (docs/inference.md).

Every kind loads as a :class:`Segmenter` — a callable from ImageNet-normalised float images (N,3,H,W) to
logits (N,C,H,W) at the input size:

* a teacher bundle (``teacher_bundle.pt``, or its folder; an imported teacher is a bundle too),
* a student run folder (``runs/<name>/student/<run>/``) or its ``best.pt``: the plain student, without the
  distillation modules (``model_state``),
* a TorchScript or ONNX file written by :func:`export_segmenter`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attnfd_pipeline import augment
from attnfd_pipeline.config import Config
from attnfd_pipeline.data import datasets
from attnfd_pipeline.data.datasets import DataError, DatasetInfo
from attnfd_pipeline.data.io import read_image, write_jpeg, write_palette_png
from attnfd_pipeline.data.loaders import make_val_loader
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.engine.checkpoint import load_checkpoint, load_modules
from attnfd_pipeline.engine.protocol import EvalProtocol
from attnfd_pipeline.engine.train import evaluate
from attnfd_pipeline.models import build_model
from attnfd_pipeline.progress import Progress
from attnfd_pipeline.teacher import BUNDLE, BUNDLE_NAME, load_teacher, load_teacher_info
from attnfd_pipeline.utils import resolve_device
from attnfd_pipeline.errors import UserError

EXPORT_FORMAT = "attnfd-export/1"
EXPORT_FORMATS = ("torchscript", "onnx")
META_KEY = "attnfd.json"  # TorchScript extra file / ONNX metadata key holding the export's description
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def dataset_info(cfg: Config) -> DatasetInfo:
    """Class names, palette and ignore index of the config's dataset (a built-in or the one its ``[data]``
    declares): the one place inference reads them."""
    return datasets.dataset_info(cfg)


class SegmentationNet(nn.Module):
    """A segmentation model reduced to ``image → logits at the image size`` (what export traces)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["out"]


class OnnxNet:
    """An ONNX file run by onnxruntime, called like the eager network (tensors in and out)."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: image.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(image.device)


@dataclass
class Segmenter:
    """A loaded network: ``seg(images)`` → logits. ``module`` is the eager network (None for exported files)."""

    net: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    kind: str  # "teacher bundle" | "student" | "torchscript" | "onnx"
    path: Path
    info: dict = field(default_factory=dict)
    module: nn.Module | None = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "num_classes": self.num_classes, **self.info}


# ---------------------------------------------------------------------------------------------
# loading


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> Segmenter:
    """Any checkpoint kind (see the module docstring) as a :class:`Segmenter` on ``device``."""
    path = Path(path)
    if path.is_dir():
        for name in (BUNDLE_NAME, "best.pt"):
            if (path / name).is_file():
                return load_segmenter(path / name, device)
        raise FileNotFoundError(f"{path}: neither a teacher folder ({BUNDLE_NAME}) nor a finished student run "
                                f"(best.pt)")
    if not path.is_file():
        what = "teacher bundle" if path.name == BUNDLE_NAME else "checkpoint"
        raise FileNotFoundError(f"{path}: {what} not found" + (" (train it with `attnfd teacher -c CONFIG` first)" if what != "checkpoint"
                                                              else ""))
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path)
    kind = _archive_kind(path)
    if kind == "torchscript":
        return _load_torchscript(path, device)
    if kind == "bundle":
        teacher = load_teacher(path, device)
        net = SegmentationNet(teacher.model).eval()
        return Segmenter(net, teacher.num_classes, "teacher bundle", path, _teacher_info(path, teacher.info()), net)
    return _load_student(path, device)


def _archive_kind(path: Path) -> str:
    """"torchscript", "bundle" or "checkpoint", from the zip archive ``torch.save`` / ``torch.jit.save``
    write, without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any("/code/" in n for n in names):
                return "torchscript"
            pickle = next((n for n in names if n.endswith("/data.pkl")), None)
            data = z.read(pickle) if pickle is not None else b""
            if any(version.encode() in data for version in BUNDLE.versions):
                return "bundle"
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: not a teacher bundle, student checkpoint or exported model ({e})") from None
    return "checkpoint"


def _teacher_info(path: Path, info: dict) -> dict:
    out = {k: info[k] for k in ("model", "cbam_mode", "sha256")}
    out["dataset"] = load_teacher_info(path)["config"]["data"]["dataset"]  # load_teacher read this sidecar
    return out


def _load_student(path: Path, device) -> Segmenter:
    """The plain student of a Stage 2 checkpoint (``best.pt``), without the distillation modules."""
    state = load_checkpoint(path)
    weights = state["model_state"]
    if not weights:
        raise UserError(f"{path}: a checkpoint without a student network (a teacher's training checkpoint?); "
                         f"give a student run folder, its best.pt, or a teacher bundle ({BUNDLE_NAME})")
    cfg, spec = state["config"], state["extra"]["model_spec"]
    model = build_model(spec["name"], spec["num_classes"], output_stride=spec["output_stride"])
    load_modules(model, weights, path)
    net = SegmentationNet(model).eval().to(device)
    s = cfg.get("student") or {}
    info = {"model": spec["name"], "dataset": spec.get("dataset"), "run": path.parent.name, "epoch": state.get("epoch"),
            "best_miou": state.get("best"), "method": s.get("method") if s.get("alpha") else "none",
            "alpha": s.get("alpha")}
    return Segmenter(net, spec["num_classes"], "student", path, info, net)


def _load_torchscript(path: Path, device) -> Segmenter:
    files = {META_KEY: ""}
    try:
        with _quiet_jit():
            net = torch.jit.load(str(path), map_location=torch.device(device), _extra_files=files)
    except RuntimeError as e:
        raise UserError(f"{path}: not a loadable TorchScript model ({str(e).splitlines()[0]})") from None
    meta = _meta(path, files[META_KEY])
    return Segmenter(net.eval(), meta["num_classes"], "torchscript", path, _exported_info(meta))


def _load_onnx(path: Path) -> Segmenter:
    try:
        import onnx
    except ImportError:
        raise UserError(f"{path}: ONNX models need the onnx extra (pip install 'attnfd-pipeline[onnx]')") from None
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as e:  # noqa: BLE001 - any decode problem of the protobuf
        raise UserError(f"{path}: not a readable ONNX model ({e})") from None
    meta = _meta(path, props.get(META_KEY, ""))
    return Segmenter(OnnxNet(path), meta["num_classes"], "onnx", path, _exported_info(meta))


def _meta(path: Path, text: str) -> dict:
    try:
        meta = json.loads(text)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path}: not exported by `attnfd export` (no {META_KEY} description with format "
                         f"{EXPORT_FORMAT!r}): its classes and input convention are unknown")
    return meta


def _exported_info(meta: dict) -> dict:
    return {"model": meta.get("model"), "dataset": meta.get("dataset"), "exported_from": meta.get("source")}


# ---------------------------------------------------------------------------------------------
# evaluation


def check_classes(seg: Segmenter, info: DatasetInfo) -> None:
    if seg.num_classes != info.num_classes:
        raise UserError(f"{seg.path}: {seg.kind} has {seg.num_classes} classes, dataset {info.name!r} has "
                         f"{info.num_classes}")


def evaluate_segmenter(cfg: Config, seg: Segmenter, *, split: str | None = None, device=None,
                       progress: bool = False) -> dict[str, Any]:
    """Metrics of ``seg`` on ``split`` (default: the val split) under ``cfg.eval``; the result names the
    protocol, the checkpoint, the dataset and the split, and gives per-class IoU with class names."""
    student = seg.kind != "teacher bundle"
    train = cfg.student.train if student else cfg.teacher.train
    device = torch.device(device) if device is not None else resolve_device(train.device)
    src = ImageSource.from_config(cfg, split or cfg.data.val_split)
    info = src.info
    check_classes(seg, info)
    protocol = EvalProtocol.from_config(cfg)
    loader = make_val_loader(src, protocol, batch_size=train.val_batch_size, workers=min(cfg.data.num_workers, 1),
                             device=device)
    if isinstance(seg.net, nn.Module):
        seg.net.to(device)
    m = evaluate(seg, loader, info.num_classes, device, class_names=info.class_names, amp=train.amp,
                 progress=progress, protocol=protocol)
    m.update(checkpoint=seg.describe(), dataset=info.name, split=src.split, images=len(src))
    return m


def evaluate_checkpoint(cfg: Config, path: str | Path, *, split: str | None = None, progress: bool = False) -> dict:
    """:func:`evaluate_segmenter` of the checkpoint at ``path`` (any kind)."""
    return evaluate_segmenter(cfg, load_segmenter(path), split=split, progress=progress)


def format_metrics(m: dict) -> str:
    """Evaluation metrics as Markdown: a summary line, the protocol, the per-class IoU table."""
    pct = lambda v: "—" if v is None or v != v else f"{v * 100:.2f}"  # noqa: E731 - None/NaN: class absent
    ck = m.get("checkpoint") or {}
    lines = [f"mIoU {pct(m['miou'])}  pixel acc {pct(m['pixel_acc'])}  class acc {pct(m['class_acc'])}  "
             f"FWIoU {pct(m['fwiou'])}", ""]
    if ck:
        lines.append(f"- checkpoint: `{ck.get('path')}` ({ck.get('kind')}, {ck.get('model') or '?'})")
    if "dataset" in m:
        lines.append(f"- data: {m['dataset']} / {m['split']} ({m['images']} images)")
    if "protocol" in m:
        lines.append(f"- protocol: **{m['protocol']['name']}** — {m['protocol']['text']}")
    names = m.get("class_names") or [str(i) for i in range(len(m["per_class_iou"]))]
    lines += ["", "| class | IoU % |", "| --- | --- |"]
    lines += [f"| {n} | {pct(v)} |" for n, v in zip(names, m["per_class_iou"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# prediction


def list_images(spec: str | Path) -> list[Path]:
    """The images named by ``spec``: a folder (its image files), one file, or a glob pattern."""
    spec = str(spec)
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
        files = [p]
    elif glob.has_magic(spec):
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    else:
        raise FileNotFoundError(f"{spec}: no such file or folder")
    if not files:
        raise UserError(f"{spec}: no images there (a folder is searched for {', '.join(IMAGE_SUFFIXES)})")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise UserError(f"{f} and {seen[f.stem]} would both be written as {f.stem}.png: predict one folder "
                             f"at a time")
        seen[f.stem] = f
    return files


class _Images(Dataset):
    """Images read in loader workers; an unreadable one becomes an error entry instead of an exception."""

    def __init__(self, files: list[Path]):
        self.files = np.array([str(f) for f in files])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        try:
            return {"path": self.files[i], "image": read_image(self.files[i]), "error": None}
        except DataError as e:
            return {"path": self.files[i], "image": None, "error": str(e)}


def _as_list(batch: list) -> list:
    return batch


@dataclass
class PredictResult:
    written: list[Path]  # one palette PNG per readable image
    skipped: list[tuple[str, str]]  # (path, why) of every image that could not be read
    seconds: float


def predict_images(cfg: Config, seg: Segmenter, inputs: str | Path, out_dir: str | Path, *, overlay: bool = False,
                   batch_size: int = 8, device=None, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> PredictResult:
    """Segment every image of ``inputs`` (folder, file or glob): ``out_dir/<stem>.png`` is a palette PNG of
    class indices at the image's own size (the dataset's palette); ``overlay`` adds ``out_dir/overlay/<stem>.jpg``
    (image and class colours half and half). The model sees each image as ``cfg.eval``'s protocol scales it
    (``EvalProtocol.model_input``); its logits are resized back. Unreadable images are logged and skipped."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    files = list_images(inputs)
    info = dataset_info(cfg)
    check_classes(seg, info)
    device = torch.device(device) if device is not None else resolve_device(cfg.student.train.device)
    if isinstance(seg.net, nn.Module):
        seg.net.to(device)
    protocol, out_dir = EvalProtocol.from_config(cfg), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = cfg.data.num_workers
    # forkserver, as for every loader here (data.loaders.make_loader): torch threads in the parent make fork fragile
    loader = DataLoader(_Images(files), batch_size=batch_size, num_workers=workers, collate_fn=_as_list,
                        multiprocessing_context="forkserver" if workers > 0 else None)
    written, skipped, t0 = [], [], time.perf_counter()
    bar = Progress(len(files), "predict", "img", enabled=progress)
    for batch in loader:
        for item in batch:
            if item["error"] is not None:
                skipped.append((item["path"], item["error"]))
                log(f"skipped {item['path']}: {item['error']}")
        good = [item for item in batch if item["error"] is None]
        for item, mask in zip(good, _masks(seg, protocol, [item["image"] for item in good], device)):
            stem = Path(item["path"]).stem
            write_palette_png(out_dir / f"{stem}.png", mask, info.palette)
            if overlay:
                write_jpeg(out_dir / "overlay" / f"{stem}.jpg", overlay_image(item["image"], mask, info))
            written.append(out_dir / f"{stem}.png")
        bar.update(len(batch))
    bar.close()
    return PredictResult(written, skipped, time.perf_counter() - t0)


def _masks(seg: Segmenter, protocol: EvalProtocol, images: list[torch.Tensor], device) -> list[np.ndarray]:
    """uint8 class masks at each image's own size; images the protocol brings to one size run as one batch."""
    inputs = [protocol.model_input(im) for im in images]
    masks: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(tuple(x.shape[-2:]), []).append(i)
    for idx in groups.values():
        x = augment.normalize(torch.stack([inputs[i] for i in idx]).to(device))
        logits = protocol.input_logits(seg, x)
        for j, i in enumerate(idx):
            full = protocol.resize_logits(logits[j:j + 1], tuple(images[i].shape[-2:]))
            masks[i] = full[0].argmax(0).to(torch.uint8).cpu().numpy()
    return masks  # type: ignore[return-value]


def overlay_image(image: torch.Tensor, mask: np.ndarray, info: DatasetInfo, alpha: float = 0.5) -> np.ndarray:
    """uint8 (3,H,W): the image blended with the class colours of ``mask``."""
    colours = info.palette_array()[mask].transpose(2, 0, 1).astype(np.float32)
    return (image.numpy().astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# export


def export_meta(seg: Segmenter, info: DatasetInfo | None) -> dict:
    """What an exported file says about itself: classes, palette, the input convention, its source."""
    meta = {"format": EXPORT_FORMAT, "source": str(seg.path), "kind": seg.kind, "model": seg.info.get("model"),
            "num_classes": seg.num_classes, "input": "float32 (N, 3, H, W) RGB in [0, 1], minus mean, over std",
            "mean": list(augment.IMAGENET_MEAN), "std": list(augment.IMAGENET_STD),
            "output": "float32 (N, C, H, W) logits at the input size"}
    if info is not None:
        meta.update(dataset=info.name, class_names=list(info.class_names),
                    palette=[list(c) for c in info.palette], ignore_index=info.ignore_index)
    return meta


def check_export_name(fmt: str, out: str | Path) -> None:
    """Before anything is written: the format is known and ``out``'s name says it (``load_segmenter`` reads a
    ``.onnx`` file as ONNX and anything else as a torch archive, so a mismatched name is a file nothing reads)."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: a folder; give the file to write (e.g. {out / ('model.onnx' if fmt == 'onnx' else 'model.pt')})")
    onnx_name = out.suffix.lower() == ".onnx"
    if (fmt == "onnx") != onnx_name:
        want = out.with_suffix(".onnx" if fmt == "onnx" else ".pt").name
        raise UserError(f"--out {out}: a {fmt} export needs a name ending in {'.onnx' if fmt == 'onnx' else '.pt'} "
                         f"(--format {fmt} --out {want}); nothing was written")


def export_segmenter(seg: Segmenter, fmt: str, out: str | Path, *, example_hw: tuple[int, int],
                     info: DatasetInfo | None = None) -> Path:
    """Write ``seg``'s network alone as TorchScript (traced) or ONNX (batch, height and width dynamic), with
    :func:`export_meta` inside; written through a temporary file, so ``out`` is complete or absent."""
    if seg.module is None:
        raise UserError(f"{seg.path}: already an exported {seg.kind} model; export from the checkpoint it came from")
    check_export_name(fmt, out)
    if info is not None:
        check_classes(seg, info)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    net = seg.module.cpu().eval()
    example = torch.zeros(1, 3, *example_hw)
    meta = json.dumps(export_meta(seg, info))
    try:
        if fmt == "torchscript":
            with torch.no_grad(), _quiet_jit():
                traced = torch.jit.trace(net, example)
                torch.jit.save(traced, str(tmp), _extra_files={META_KEY: meta})
        else:
            _export_onnx(net, example, tmp, meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def _quiet_jit():
    """TorchScript without its warnings: the tracer's "shapes become constants" is wrong here (the traced graph
    reads sizes, tested on other sizes), and its deprecation notice is in docs/inference.md."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


def _export_onnx(net: nn.Module, example: torch.Tensor, path: Path, meta: str) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401 - the exporter needs it; fail here with the fix rather than deep inside
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install 'attnfd-pipeline[onnx]'") from None
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_shapes={"image": dims}, external_data=False, dynamo=True, verbose=False)
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, meta
    onnx.save(model, str(path))


def compare_outputs(a: Segmenter, b: Segmenter, hw: tuple[int, int], *, batch: int = 2, seed: int = 0) -> float:
    """Max |a − b| of the logits on a random normalised batch of size ``hw`` (export check)."""
    x = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed))
    if isinstance(a.net, nn.Module):
        a.net.cpu()
    if isinstance(b.net, nn.Module):
        b.net.cpu()
    return float((a(x).float() - b(x).float()).abs().max())
