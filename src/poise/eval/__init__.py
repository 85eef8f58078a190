from poise.eval.metrics import accuracy, evaluate, macro_f1
from poise.eval.probe import linear_probe

__all__ = ["accuracy", "evaluate", "linear_probe", "macro_f1"]
