from poise.train.trainer import RunResult, Trainer

__all__ = ["RunResult", "Trainer"]
