"""Nothing runs from a file the pipeline loads: every torch file is read weights-only, hashes are checked on
the bytes before deserialising, and checkpoints written by older versions (NumPy RNG states) still load."""

from __future__ import annotations

import builtins
import hashlib
import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnfd_pipeline.config import dump_toml, load_config
from attnfd_pipeline.engine.checkpoint import FORMAT, FORMATS, load_checkpoint, save_checkpoint
from attnfd_pipeline.safe_load import UnsafeFileError, load_torch_file, sidecar_path
from attnfd_pipeline.utils import rng_state, set_rng_state
from stages.cli import app

runner = CliRunner()


class Payload:
    """Unpickling this creates ``marker``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def craft(path, marker, **fields):
    torch.save({**fields, "payload": Payload(marker)}, path)
    return path


def test_the_crafted_payload_is_live(tmp_path):
    """Control: an unsafe load of the crafted file does create the marker (so its absence below means refusal)."""
    marker = tmp_path / "control"
    torch.load(craft(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.fixture
def cli_cfg(tiny_data, tmp_path):
    from conftest import make_cfg

    cfg = make_cfg(tiny_data, tmp_path)
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(cfg))
    return cfg, p, tmp_path


def _refused(r, path, marker):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and str(path) in r.output, r.output
    assert "refused to load" in r.output and "io.open" in r.output, r.output
    assert not marker.exists()


def test_crafted_files_are_refused_by_every_command(cli_cfg):
    """`evaluate --bundle`, `cache build` (a bundle with a matching sidecar: the hash passes, the unpickler
    refuses), `student --resume` (crafted last.pt) and `teacher import` refuse with one clear line."""
    from attnfd_pipeline.runs import student_dir
    from attnfd_pipeline.teacher import BUNDLE_FORMAT

    cfg, p, tmp = cli_cfg
    marker = tmp / "pwned"
    evil = craft(tmp / "evil_bundle.pt", marker, format=BUNDLE_FORMAT)
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    evil.with_suffix(".json").write_text(json.dumps({"format": BUNDLE_FORMAT, "file_sha256": sha, "sha256": "0" * 64,
                                                     "num_classes": 11, "model": "x", "points": ["D"]}))
    _refused(runner.invoke(app, ["evaluate", "--config", str(p), "--bundle", str(evil)]), evil, marker)
    _refused(runner.invoke(app, ["cache", "build", "--config", str(p), "--teacher", str(evil), "--no-progress"]),
             evil, marker)

    last = student_dir(load_config(p, ["student.alpha=0"])) / "last.pt"
    last.parent.mkdir(parents=True)
    craft(last, marker, format=FORMAT)
    _refused(runner.invoke(app, ["student", "--config", str(p), "--set", "student.alpha=0", "--resume"]), last, marker)

    foreign = craft(tmp / "downloaded_teacher.pth.tar", marker, state_dict={}, epoch=1)
    _refused(runner.invoke(app, ["teacher", "import", str(foreign), "--config", str(p)]), foreign, marker)


def test_checkpoint_round_trip_needs_no_allow_list_and_restores_the_rngs(tmp_path):
    """A new checkpoint holds only tensors and plain values (no global beyond torch's own), its sidecar
    records the bytes' SHA-256, and its RNG states restore every generator exactly."""
    model = torch.nn.Linear(3, 2)
    metrics = {"miou": np.float64(0.25), "confusion": np.eye(3, dtype=np.int64)}
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save_checkpoint(tmp_path / "last.pt", modules=model, optimizer=None, scheduler=None, scaler=None,
                           epoch=1, step=2, best=0.5, rng=rng_state(), config={"a": 1}, extra={"metrics": metrics})
    expected = random.random(), np.random.rand(), torch.rand(1)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    assert sidecar_path(path).read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()
    state = load_checkpoint(path)
    assert state["extra"]["metrics"]["miou"] == 0.25 and torch.equal(state["extra"]["metrics"]["confusion"],
                                                                    torch.eye(3, dtype=torch.int64))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_a_modified_checkpoint_is_refused_before_deserialising(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", modules=torch.nn.Linear(3, 2), optimizer=None, scheduler=None,
                           scaler=None, epoch=1, step=1, best=0.0, rng=rng_state(), config={})
    data = bytearray(path.read_bytes())
    data[-30] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"SHA-256 of the file .* recorded in .*last\.pt\.sha256"):
        load_checkpoint(path)


def test_a_checkpoint_written_before_this_change_still_loads(tmp_path):
    """Old checkpoints hold NumPy's RNG state (an ndarray) and NumPy metrics, and have no sidecar: they
    load weights-only through the numeric-NumPy allow-list, and their RNG state restores."""
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = random.random(), np.random.rand()
    state = {"format": FORMATS[0], "modules": torch.nn.Linear(3, 2).state_dict(), "optimizer": None, "scheduler": None,
             "scaler": None, "epoch": 2, "step": 4, "best": 0.1, "rng": old_rng, "config": {},
             "extra": {"metrics": {"miou": np.float64(0.1), "confusion": np.zeros((2, 2))}}}
    torch.save(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand()) == expected


def test_object_arrays_are_not_allowed(tmp_path):
    torch.save({"x": np.array([{"a": 1}], dtype=object)}, tmp_path / "o.pt")
    with pytest.raises(UnsafeFileError, match="refused to load"):
        load_torch_file(tmp_path / "o.pt")


def test_a_modified_bundle_is_refused_before_deserialising(tiny_cfg, tmp_path):
    from attnfd_pipeline.models import build_model
    from attnfd_pipeline.teacher import load_teacher, save_bundle

    bundle = save_bundle(tmp_path / "teacher_bundle.pt", tiny_cfg, build_model("deeplabv3plus_resnet18", 3,
                         inpath_attention=tiny_cfg.teacher.points), None, 3)
    load_teacher(bundle)  # intact: loads
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    bundle.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"SHA-256 of the file .*teacher_bundle\.json"):
        load_teacher(bundle)


def test_state_mismatch_names_every_kind_and_skips_what_it_is_told():
    from attnfd_pipeline.safe_load import state_mismatch

    own = {"a": torch.zeros(3), "b": torch.zeros(2, 2), "bn.num_batches_tracked": torch.zeros(())}
    assert state_mismatch(own, dict(own)) == []
    state = {"a": torch.zeros(5), "c": torch.zeros(1)}
    assert state_mismatch(own, state) == ["1 mis-shaped keys: a (file (5,), expected (3,))",
                                          "2 missing keys: b, bn.num_batches_tracked", "1 unexpected keys: c"]
    assert state_mismatch(own, state, skip=lambda k: k.endswith("num_batches_tracked") or k == "c",
                          shown=0) == ["1 mis-shaped keys:  (+1 more)", "1 missing keys:  (+1 more)"]
