"""Text data augmentation: EDA (synonym replacement, random insertion, random swap, random deletion) with an offline
synonym table. `augment_rows` makes the copies; `fastcls augment` writes an augmented file (command.py)."""
from fastcls.augment.config import OPS, EdaConfig
from fastcls.augment.eda import Augmented, augment_rows
from fastcls.augment.synonyms import Coverage, SynonymTable

__all__ = ["OPS", "Augmented", "Coverage", "EdaConfig", "SynonymTable", "augment_rows"]
