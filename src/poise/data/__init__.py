from poise.data.base import DatasetInfo, DataSplits, ModalitySpec, TensorMultimodalDataset, evaluation_view
from poise.data.batch import MultimodalBatch, collate
from poise.data.registry import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetInfo",
    "ModalitySpec",
    "MultimodalBatch",
    "TensorMultimodalDataset",
    "collate",
    "evaluation_view",
    "load_dataset",
]
