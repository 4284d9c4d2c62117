"""`attnfd bench-storage --checkpoint`: the teacher of a training checkpoint is read as every checkpoint is
(hash-checked before deserialising, weights-only), and it is the network the checkpoint holds."""

from __future__ import annotations

import shutil

import pytest
import torch

from attnfd_pipeline.engine.checkpoint import load_checkpoint
from attnfd_pipeline.errors import UserError
from attnfd_pipeline.experiments.fidelity import teacher_from_checkpoint


def test_the_checkpoint_teacher_is_the_saved_network_and_a_modified_file_is_refused(tiny_pipeline, tmp_path):
    cfg, _ = tiny_pipeline
    last = cfg.teacher_dir / "train" / "last.pt"
    teacher = teacher_from_checkpoint(cfg, last)
    saved = load_checkpoint(last)["modules"]
    got = teacher.model.state_dict()
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)  # bit for bit

    copy = tmp_path / "last.pt"
    shutil.copy(last, copy)
    shutil.copy(last.with_name("last.pt.sha256"), tmp_path / "last.pt.sha256")
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the recorded hash no longer matches
    copy.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"last\.pt: SHA-256 of the file .* nothing was loaded"):
        teacher_from_checkpoint(cfg, copy)
