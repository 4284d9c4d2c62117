"""Distillation methods, registered by name (``get_method``, ``list_methods``).

A method lives in one module: its config section (a ``MethodSection`` dataclass, ``student.<name>``), the targets
it reads, its modules and its loss; ``@register`` makes it a ``student.method`` name and its section a config key.

Importing this package registers every built-in method: ``attnfd`` (the default), ``kd``, ``lad``,
``aicsd``, ``afdcd``, ``cirkd`` and ``dist``. ``student.method`` names one, or several joined by ``+``.
"""

from attnfd_pipeline.losses.base import (DistillMethod, MethodContext, MethodSection, build_methods, connector,
                                         get_method, list_methods, match_size, method_label, method_sections,
                                         parse_methods, register, required_targets)
from attnfd_pipeline.losses.attnfd import NORMS, AttnFD, AttnFDConfig, attnfd_loss  # noqa: I001 - registration order
from attnfd_pipeline.losses.kd import KD, KDConfig, kd_loss
from attnfd_pipeline.losses.lad import LAD, LADConfig
from attnfd_pipeline.losses.aicsd import AICSD, AICSDConfig, alw_weight, ics_loss, ics_matrix
from attnfd_pipeline.losses.afdcd import AfDCD, AfDCDConfig, omni_contrastive_loss
from attnfd_pipeline.losses.cirkd import CIRKD, CIRKDConfig, cross_image_relation_loss
from attnfd_pipeline.losses.dist import DIST, DISTConfig, dist_loss

__all__ = [
    "AICSD", "AICSDConfig", "AfDCD", "AfDCDConfig", "AttnFD", "AttnFDConfig", "CIRKD", "CIRKDConfig", "DIST",
    "DISTConfig", "DistillMethod", "KD", "KDConfig", "LAD", "LADConfig", "MethodContext", "MethodSection", "NORMS",
    "alw_weight", "attnfd_loss", "build_methods", "connector", "cross_image_relation_loss", "dist_loss",
    "get_method", "ics_loss", "ics_matrix", "kd_loss", "list_methods", "match_size", "method_label",
    "method_sections", "omni_contrastive_loss", "parse_methods", "register", "required_targets"
]
