"""RunRecord: result.json round trip, the defaults of results written before a field existed, the fallback
to the run's resolved config, and clear errors for a broken file."""

from __future__ import annotations

import json

import pytest

from attnfd_pipeline.config import LEGACY_SEED_ORDER, dump_toml, load_config
from attnfd_pipeline.records import CENTER_CROP, RunRecord, read_record


def test_round_trip_equals_the_file_read_back(tmp_path):
    rec = RunRecord(run="r", model="m", method="attnfd+kd", methods=("attnfd", "kd"), weights={"kd": 0.5},
                    alpha=2.0, norm="batch", points=("B", "D"), mode="online", augment="fresh", seed_order=None,
                    seed=3, K=4, targets=("B", "D", "logits"), dataset="demo", final_miou=0.5,
                    per_class_iou=(0.9, None), class_names=("a", "b"))
    d = rec.to_dict()
    assert d["points"] == ["B", "D"] and d["eval_protocol"] == CENTER_CROP
    (tmp_path / "result.json").write_text(json.dumps(d))
    assert json.loads((tmp_path / "result.json").read_text()) == d
    back = read_record(tmp_path)
    assert back == rec and back.mode_tag == "online-fresh" and back.fresh and back.distilled


def test_old_results_get_the_old_defaults():
    old = RunRecord.from_dict({"run": "x", "alpha": 2.0, "method": "attnfd", "mode": "cached", "final_miou": 0.4,
                               "some_future_key": 1})
    assert (old.seed_order, old.augment, old.eval_protocol, old.mode_tag) == (LEGACY_SEED_ORDER, "replay",
                                                                              CENTER_CROP, "cached")
    plain = RunRecord.from_dict({"run": "y", "alpha": 0.0, "method": "attnfd", "mode": "online", "augment": "fresh"})
    assert plain.method == "none" and plain.seed_order is None and plain.mode_tag == "online-fresh"
    assert not RunRecord.from_dict({"run": "z"}).finished


def test_missing_fields_come_from_the_resolved_config(tmp_path):
    cfg = load_config("configs/demo.toml", ["student.alpha=3", "cache.K=2", 'student.mode="online"',
                                            "student.online_fresh=true", "student.train.seed=7"])
    (tmp_path / "config.resolved.toml").write_text(dump_toml(cfg))
    (tmp_path / "result.json").write_text(json.dumps({"final_miou": 0.3}))
    rec = read_record(tmp_path)
    assert (rec.run, rec.alpha, rec.K, rec.seed, rec.mode_tag, rec.method) == (tmp_path.name, 3.0, 2, 7,
                                                                               "online-fresh", "attnfd")
    assert rec.points == tuple(cfg.student.points) and rec.model == cfg.student.model.name


def test_a_broken_result_names_the_file(tmp_path):
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"result\.json: not valid JSON"):
        read_record(tmp_path)
    (tmp_path / "result.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"result\.json: expected a JSON object, got list"):
        read_record(tmp_path)
