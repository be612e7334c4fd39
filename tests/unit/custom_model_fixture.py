"""Build functions that test_catalog.py names in ``model.custom``."""

from __future__ import annotations

import math

from torch import nn


def build(feature_shape, num_outputs, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(feature_shape), width), nn.ReLU(), nn.Linear(width, num_outputs))


def not_a_module(feature_shape, num_outputs):
    return "a string"


def wrong_output(feature_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(feature_shape), num_outputs + 1))


NOT_CALLABLE = 42
