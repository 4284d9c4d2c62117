"""Distillation methods, registered by name (``get_method``, ``list_methods``).

Importing this package registers every built-in method: ``attnfd`` (the default), ``kd``, ``lad``,
``aicsd``, ``afdcd``, ``cirkd`` and ``dist``. ``student.method`` names one, or several joined by ``+``.
"""

from attnfd_pipeline.losses.base import (DistillMethod, MethodContext, build_methods, connector, get_method,
                                         list_methods, match_size, method_label, parse_methods, register,
                                         required_targets)
from attnfd_pipeline.losses.attnfd import NORMS, AttnFD, attnfd_loss  # noqa: I001 - registration order
from attnfd_pipeline.losses.kd import KD, kd_loss
from attnfd_pipeline.losses.lad import LAD
from attnfd_pipeline.losses.aicsd import AICSD, alw_weight, ics_loss, ics_matrix
from attnfd_pipeline.losses.afdcd import AfDCD, omni_contrastive_loss
from attnfd_pipeline.losses.cirkd import CIRKD, cross_image_relation_loss
from attnfd_pipeline.losses.dist import DIST, dist_loss

__all__ = [
    "AICSD", "AfDCD", "AttnFD", "CIRKD", "DIST", "DistillMethod", "KD", "LAD", "MethodContext", "NORMS", "alw_weight",
    "attnfd_loss", "build_methods", "connector", "cross_image_relation_loss", "dist_loss", "get_method", "ics_loss",
    "ics_matrix", "kd_loss", "list_methods", "match_size", "method_label", "omni_contrastive_loss", "parse_methods", "register",
    "required_targets",
]
