"""A run's variant (``runs.run_variant``) is the part of its name the lab reads back (``runs.variant_tag``)
to keep runs that trained differently out of each other's rows."""

import pytest

from attnfd_pipeline.config import load_config
from attnfd_pipeline.runs import run_name, run_variant, variant_tag

CASES = [  # overrides of configs/demo.toml → the variant
    ([], ""),
    (["cache.encoding=\"int8\""], "int8"),
    (["cache.encoding=\"int8\"", "cache.pool={D=2}"], "int8_poolD2"),
    (["student.ce_batch_average=true", "student.cbam_trainable=\"conv_bn\""], "ceavg_convbn"),
    (["student.alpha=0", "student.ce_batch_average=true", "cache.encoding=\"int8\""], "ceavg"),
    (["student.alpha=0", "student.targets=\"online-fresh\""], ""),
    (["student.targets=\"online-fresh\"", "cache.encoding=\"int8\""], ""),  # storage tags only cached runs
]


@pytest.mark.parametrize("overrides,variant", CASES)
def test_the_name_carries_the_variant_and_gives_it_back(overrides, variant):
    cfg = load_config("configs/demo.toml", overrides)
    assert run_variant(cfg) == variant
    assert variant_tag(run_name(cfg)) == variant
    assert run_name(cfg).endswith(("_" + variant if variant else "") + f"_s{cfg.student.train.seed}")


def test_a_method_setting_is_a_variant_of_its_own():
    base = load_config("configs/demo.toml", ["student.method=\"kd\""])
    hot = load_config("configs/demo.toml", ["student.method=\"kd\"", "student.kd.temperature=4.0"])
    assert run_variant(hot).startswith("p") and run_variant(hot) != run_variant(base)
    assert variant_tag(run_name(hot)) == run_variant(hot)


def test_names_of_finished_runs_are_kept():
    """Run names find finished runs: the refactor into run_variant must not rename any."""
    cfg = load_config("configs/demo.toml", ["student.train.seed=3"])
    assert run_name(cfg) == f"{cfg.student.model.name}_attnfd_a30_batch_D_cached_K4_s3"
    plain = load_config("configs/demo.toml", ["student.alpha=0", "student.ce_batch_average=true"])
    assert run_name(plain) == f"{plain.student.model.name}_baseline_K4_ceavg_s0"
