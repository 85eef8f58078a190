"""Balancing methods and the registry that names them."""

from poise.methods.base import Method, MethodParams, StepPlan
from poise.methods.registry import METHODS, make_method

__all__ = ["METHODS", "Method", "MethodParams", "StepPlan", "make_method"]
