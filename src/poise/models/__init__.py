from poise.models.encoders import ENCODERS
from poise.models.fusion import FUSIONS, Fusion
from poise.models.model import ModelOutput, MultimodalModel, build_model

__all__ = ["ENCODERS", "FUSIONS", "Fusion", "ModelOutput", "MultimodalModel", "build_model"]
