"""SOHO: end-to-end vision-language pre-training with a visual dictionary (Huang et al., CVPR 2021).

Pure model code (torch, torchvision, transformers). ``soho.train`` is the CLI shim into orchestration and is
not imported here.
"""

from soho.config import (
    GridEncoderConfig,
    PretrainConfig,
    SohoConfig,
    TransformerConfig,
    VDConfig,
    get_preset,
    soho_base,
    soho_small,
    soho_tiny,
)
from soho.encoder import GridEncoder
from soho.modeling import PretrainOutput, SohoForPretraining, SohoModel, SohoModelOutput
from soho.text import default_text_model_path
from soho.transformer import CrossModalEncoder
from soho.visual_dictionary import VDOutput, VisualDictionary

__all__ = [
    "CrossModalEncoder",
    "GridEncoder",
    "GridEncoderConfig",
    "PretrainConfig",
    "PretrainOutput",
    "SohoConfig",
    "SohoForPretraining",
    "SohoModel",
    "SohoModelOutput",
    "TransformerConfig",
    "VDConfig",
    "VDOutput",
    "VisualDictionary",
    "default_text_model_path",
    "get_preset",
    "soho_base",
    "soho_small",
    "soho_tiny",
]
