"""poise: balanced multimodal learning in plain PyTorch."""

__version__ = "0.1.0"
