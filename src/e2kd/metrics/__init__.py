"""Metrics of the paper's desiderata: accuracy, agreement and explanation similarity; F1;
localisation (EPG, IoU, the grid pointing game); shift equivariance; group robustness.

Functions score one batch; the ``*Meter`` classes (``update(...)`` per batch, ``compute()``)
accumulate a test set in batches and add up over DDP ranks with ``meter.all_reduced()``.
Built on the core (torch only).
"""

from ._streaming import StreamingMetric
from .classification import (
    ClassificationMeter,
    MultilabelF1Meter,
    agreement,
    class_rank,
    explanation_similarity,
    multilabel_f1,
    multilabel_predictions,
    topk_correct,
)
from .grid import Grids, build_grids, grid_cell_energy, grid_pointing_game, model_confidences
from .groups import GroupRobustnessMeter, group_robustness
from .localisation import (
    BINARISATION_RULES,
    LocalisationMeter,
    binarise,
    energy_pointing_game,
    explain_present_classes,
    iou,
    present_class_pairs,
)
from .shift import ShiftEquivariance, shift_equivariance, shifted_view

__all__ = [
    "BINARISATION_RULES",
    "ClassificationMeter",
    "Grids",
    "GroupRobustnessMeter",
    "LocalisationMeter",
    "MultilabelF1Meter",
    "ShiftEquivariance",
    "StreamingMetric",
    "agreement",
    "class_rank",
    "binarise",
    "build_grids",
    "energy_pointing_game",
    "explain_present_classes",
    "explanation_similarity",
    "grid_cell_energy",
    "grid_pointing_game",
    "group_robustness",
    "iou",
    "model_confidences",
    "multilabel_f1",
    "multilabel_predictions",
    "present_class_pairs",
    "shift_equivariance",
    "shifted_view",
    "topk_correct",
]
