"""cald_scale: Cross-Architecture Layerwise Distillation of pretrained Transformers into
linear-time students (Mamba, Mamba2; Linformer and bidirectional Mamba2 for encoders) at
scale on DeepSpeed ZeRO-3.

Importing the package registers the converted-student classes with transformers' Auto
classes, so ``AutoModelForCausalLM.from_pretrained(run_dir / "student")`` (and
``AutoModelForSequenceClassification`` for the encoder track) works.
"""

from .conversion.classifier import CaldClassifierConfig, CaldEncoderForSequenceClassification
from .conversion.modeling import (
    CaldStudentConfig,
    CaldStudentForCausalLM,
    ConversionConfig,
)
from .conversion.surgery import convert_teacher

__all__ = [
    "CaldClassifierConfig",
    "CaldEncoderForSequenceClassification",
    "CaldStudentConfig",
    "CaldStudentForCausalLM",
    "ConversionConfig",
    "convert_teacher",
]
__version__ = "0.1.0"
