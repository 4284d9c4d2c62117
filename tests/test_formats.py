"""Saved formats: each file read back later has a version and one migration per older version, tested on a
fixture of that version (``tests/fixtures/formats/``); a version this release does not know is refused
naming the file."""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from attnfd_pipeline.cache import CacheError
from attnfd_pipeline.cache.info import CACHE_JSON, CacheInfo
from attnfd_pipeline.errors import UserError
from attnfd_pipeline.formats import SavedFormat
from attnfd_pipeline.records import RESULT, RESULT_JSON_FORMAT, RunRecord, read_record

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def test_a_saved_format_steps_through_every_version_and_refuses_an_unknown_one():
    seen = []
    fmt = SavedFormat("thing.json", ("t/1", "t/2", "t/3"),
                      {"t/1": lambda d, **c: seen.append(("1→2", c)) or {**d, "b": 1},
                       "t/2": lambda d, **c: seen.append(("2→3", c)) or {**d, "c": d.get("b", 0) + 1}},
                      unversioned="t/1")
    old = {"a": 0}
    assert fmt.migrate(old, "x/thing.json", ctx=5) == {"a": 0, "b": 1, "c": 2, "format": "t/3"}
    assert seen == [("1→2", {"ctx": 5}), ("2→3", {"ctx": 5})] and old == {"a": 0}  # the input is left as it is
    assert fmt.migrate({"format": "t/2"}, "x") == {"format": "t/3", "c": 1}
    assert fmt.migrate({"format": "t/3", "z": 1}, "x") == {"format": "t/3", "z": 1}
    with pytest.raises(UserError, match=r"x/thing.json: thing.json format 't/4' is not one this release reads "
                                        r"\(t/1, t/2, t/3\); a newer attnfd-pipeline may have written it"):
        fmt.migrate({"format": "t/4"}, "x/thing.json")
    with pytest.raises(ValueError, match="no migration step"):
        SavedFormat("thing.json", ("t/1", "t/2"), {})


def test_cache_json_format_1_migrates_to_the_current_format():
    """A /1 cache.json (this fixture is one a build of that format wrote) records no checksum: its manifests
    were checksummed with blake2b; one written before cache.encoding existed holds float16."""
    raw = json.loads((FIXTURES / "cache-attnfd-cache-1.json").read_text())
    assert raw["format"] == "attnfd-cache/1" and "checksum" not in raw
    info = CacheInfo.from_json(raw, "old/cache.json")
    assert (info.format, info.written_as, info.checksum, info.encoding) == (
        "attnfd-cache/2", "attnfd-cache/1", "blake2b", "float16")
    assert info.fingerprint == raw["fingerprint"] and info.target_names[:3] == ("B", "E", "D")
    assert info.targets["D"].chw == tuple(raw["targets"]["D"]["chw"]) and info.targets["D"].pool == 1
    before_encoding = {k: v for k, v in raw.items() if k != "encoding"}
    assert CacheInfo.from_json(before_encoding, "older/cache.json").encoding == "float16"
    # the current form written and read back is the same description
    again = CacheInfo.from_json(info.to_json(), "new/cache.json")
    assert again == info.__class__(**{**info.__dict__, "written_as": "attnfd-cache/2"})
    assert CACHE_JSON.current == "attnfd-cache/2"


def test_cache_json_of_another_version_or_a_current_one_without_its_checksum_is_refused():
    raw = json.loads((FIXTURES / "cache-attnfd-cache-1.json").read_text())
    with pytest.raises(CacheError, match=r"new/cache.json: not an attnfd cache description \(format "
                                         r"'attnfd-cache/3', expected one of attnfd-cache/1, attnfd-cache/2\)"):
        CacheInfo.from_json({**raw, "format": "attnfd-cache/3"}, "new/cache.json")
    with pytest.raises(CacheError, match=r"cur/cache.json: key 'checksum' is missing"):
        CacheInfo.from_json({**raw, "format": "attnfd-cache/2"}, "cur/cache.json")


def test_result_json_format_1_migrates_with_its_resolved_config(tmp_path):
    """The first student runs' result.json records little beyond the scores and no format; its recipe is
    completed from the run's resolved config (the older student.mode spelling), and what that version
    implied: replayed cached seeds in the legacy random order, scored on the centre crop."""
    run = tmp_path / "deeplabv3plus_resnet18_attnfd_a2_batch_B-E-D_online_K4_s1"
    run.mkdir()
    shutil.copy(FIXTURES / "result-attnfd-result-1.json", run / "result.json")
    shutil.copy(FIXTURES / "result-attnfd-result-1.resolved.toml", run / "config.resolved.toml")
    rec = read_record(run)
    assert (rec.mode, rec.augment, rec.seed_order, rec.eval_protocol) == ("online", "replay", "random", "center_crop")
    assert (rec.alpha, rec.method, rec.model, rec.points, rec.seed, rec.K) == (
        2.0, "attnfd", "deeplabv3plus_resnet18", ("B", "E", "D"), 1, 4)
    assert rec.final_miou == 0.1802 and rec.mode_tag == "online" and rec.finished
    # the resolved config alone fills what the file lacks
    bare = RunRecord.from_dict({"final_miou": 0.2},
                               tomllib.loads((FIXTURES / "result-attnfd-result-1.resolved.toml").read_text()))
    assert (bare.alpha, bare.seed, bare.K, bare.mode) == (2.0, 1, 4, "online")
    # a record written now carries the current format and reads back as itself, with no config beside it
    current = rec.to_dict()
    assert current["format"] == RESULT_JSON_FORMAT == RESULT.current
    assert RunRecord.from_dict(json.loads(json.dumps(current))) == rec
    with pytest.raises(UserError, match=r"r/result.json: result.json format 'attnfd-result/9' is not one"):
        RunRecord.from_dict({**current, "format": "attnfd-result/9"}, where="r/result.json")


def test_checkpoint_format_1_migrates_its_student_weights_rng_and_seed_order(tmp_path):
    """A /1 student checkpoint as the first versions wrote it: no ``model_state`` (the plain student is its
    ``student.*`` modules), Python and NumPy RNG states as the raw ``getstate()`` tuples, no recorded
    cached-seed order (those runs followed ``random``), no ``extra.model_spec`` (the student model and dataset
    of its recorded config say which network it holds); no sidecar."""
    import random

    import numpy as np
    import torch

    from attnfd_pipeline.config import Config
    from attnfd_pipeline.engine.checkpoint import CHECKPOINT, FORMAT, load_checkpoint
    from attnfd_pipeline.runs import model_spec
    from attnfd_pipeline.utils import set_rng_state

    modules = torch.nn.ModuleDict({"student": torch.nn.Linear(3, 2), "connectors": torch.nn.Linear(2, 2)})
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = random.random(), float(np.random.rand())
    old = {"format": "attnfd-checkpoint/1", "modules": modules.state_dict(), "optimizer": None, "scheduler": None,
           "scaler": None, "epoch": 1, "step": 10, "best": 0.2, "rng": rng, "config": Config().to_dict(), "extra": {}}
    torch.save(old, tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["format"] == FORMAT == CHECKPOINT.current == "attnfd-checkpoint/2"
    assert set(state["model_state"]) == {"weight", "bias"}
    assert torch.equal(state["model_state"]["weight"], modules["student"].weight)
    assert state["extra"]["seed_order"] == "random"
    assert state["extra"]["model_spec"] == model_spec(Config(), Config().data.num_classes, "demo")
    assert isinstance(state["rng"]["python"][1], torch.Tensor) and isinstance(state["rng"]["numpy"], dict)
    set_rng_state(state["rng"])
    assert (random.random(), float(np.random.rand())) == expected
    # a teacher's /1 checkpoint has no student: no plain-student weights and no seed order are invented
    teacher = {**old, "modules": torch.nn.ModuleDict({"model": torch.nn.Linear(3, 2)}).state_dict()}
    torch.save(teacher, tmp_path / "teacher.pt")
    t = load_checkpoint(tmp_path / "teacher.pt")
    assert t["model_state"] is None and "seed_order" not in t["extra"] and "model_spec" not in t["extra"]
    torch.save({**old, "config": {"data": {}}}, tmp_path / "unsaid.pt")  # a student its config does not name
    with pytest.raises(UserError, match=r"unsaid.pt: the checkpoint does not say which student it holds"):
        load_checkpoint(tmp_path / "unsaid.pt")
    torch.save({**old, "format": "attnfd-checkpoint/7"}, tmp_path / "new.pt")
    with pytest.raises(UserError, match=r"new.pt: checkpoint format 'attnfd-checkpoint/7' is not one this release"):
        load_checkpoint(tmp_path / "new.pt")


def _first_bundle(tmp_path):
    """A /1 teacher bundle as the first versions wrote it: ``torch.save`` of the metadata with the weights,
    and a sidecar of the metadata alone, without ``file_sha256``."""
    import torch

    from attnfd_pipeline.config import Config
    from attnfd_pipeline.models import build_model
    from attnfd_pipeline.teacher import save_bundle

    cfg = Config()
    cfg = replace(cfg, teacher=replace(cfg.teacher, model=replace(cfg.teacher.model, name="deeplabv3plus_resnet18")))
    torch.manual_seed(0)
    model = build_model(cfg.teacher.model.name, 3, inpath_attention=cfg.teacher.points)
    current = save_bundle(tmp_path / "now" / "teacher_bundle.pt", cfg, model, None, 3)
    state = torch.load(current, weights_only=True)
    info = {k: v for k, v in state.items() if k not in ("model_state", "attention_state")}
    path = tmp_path / "old" / "teacher_bundle.pt"
    path.parent.mkdir()
    torch.save({**state, "format": "attnfd-teacher-bundle/1"}, path)
    path.with_suffix(".json").write_text(json.dumps({**info, "format": "attnfd-teacher-bundle/1"}))
    return current, path, model


def test_teacher_bundle_format_1_migrates_and_a_pt_alone_is_refused(tmp_path):
    """A /1 sidecar records no SHA-256 of the .pt's bytes: the .pt is read weights-only without that check and
    its weights hash is checked after; a /2 bundle (written now) records it. A .pt without its sidecar is
    refused naming what to do, and a newer version naming the file."""
    import torch

    from attnfd_pipeline.inference import load_segmenter
    from attnfd_pipeline.teacher import BUNDLE, BUNDLE_FORMAT, load_teacher, load_teacher_info

    current, old, model = _first_bundle(tmp_path)
    assert BUNDLE.current == BUNDLE_FORMAT == "attnfd-teacher-bundle/2"
    info = load_teacher_info(old)
    assert info["format"] == BUNDLE_FORMAT and info["file_sha256"] is None
    assert load_teacher_info(current)["file_sha256"] == hashlib.sha256(current.read_bytes()).hexdigest()
    teacher = load_teacher(old)
    assert teacher.sha256 == info["sha256"] == load_teacher(current).sha256
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in teacher.model.state_dict().items())
    assert load_segmenter(old).kind == "teacher bundle"  # inference tells a /1 bundle from a checkpoint too
    side = old.with_suffix(".json")
    side.write_text(json.dumps({**info, "format": "attnfd-teacher-bundle/3"}))
    with pytest.raises(UserError, match=r"old/teacher_bundle.json: teacher bundle format 'attnfd-teacher-bundle/3' "
                                        r"is not one this release reads"):
        load_teacher_info(old)
    side.unlink()
    with pytest.raises(UserError, match=r"teacher_bundle.json: not found beside teacher_bundle.pt.*attnfd teacher "
                                        r"import"):
        load_teacher(old)
