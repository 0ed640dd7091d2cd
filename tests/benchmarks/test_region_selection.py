"""benchmarks/region_vs_grid.py: BUTD's class-wise NMS confidence and box-selection rule, checked by hand
(the benchmark's workload depends on them: exactly N boxes per image out of NMS over every class)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "region_vs_grid.py"
_spec = importlib.util.spec_from_file_location("region_vs_grid", _PATH)
region_vs_grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(region_vs_grid)

# A and B overlap (IoU 81/119 ≈ 0.68 > 0.3), C stands apart. Columns: background, class 1, class 2.
BOXES = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
SCORES = torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.5, 0.4], [0.8, 0.1, 0.1]])


def test_classwise_nms_keeps_each_proposals_best_surviving_class_score() -> None:
    max_conf, classes = region_vs_grid.classwise_max_conf(BOXES, SCORES)
    # Class 1: A (0.6) suppresses B, C kept at 0.1. Class 2: B (0.4) suppresses A, C kept at 0.1.
    # The background column is never a class.
    assert classes == 2
    torch.testing.assert_close(max_conf, torch.tensor([0.6, 0.4, 0.1]), rtol=0, atol=0)


def test_butd_selection_thresholds_then_fills_or_cuts_to_fixed_count() -> None:
    select = region_vs_grid.select_boxes
    max_conf = torch.tensor([0.1, 0.6, 0.0, 0.4, 0.25])  # three pass 0.2: 1, 3, 4
    assert select(max_conf, 10, 100).tolist() == [1, 3, 4, 0, 2]  # fewer than MIN → top up by max_conf
    assert select(max_conf, 1, 100).tolist() == [1, 3, 4]  # between MIN and MAX → those above 0.2
    assert select(max_conf, 2, 2).tolist() == [1, 3]  # fixed N = 2 with more passing → top 2
    assert select(max_conf, 4, 4).tolist() == [1, 3, 4, 0]  # fixed N = 4 with 3 passing → filled
    ties = torch.tensor([0.0, 0.5, 0.5, 0.0])
    assert select(ties, 3, 3).tolist() == [1, 2, 0]  # ties keep proposal (RPN objectness) order
