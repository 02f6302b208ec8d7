"""cald_scale: Cross-Architecture Layerwise Distillation of pretrained Transformers into
linear-time students (Mamba, Mamba2) at scale on DeepSpeed ZeRO-3.

Importing the package registers the converted-student classes with transformers' Auto
classes, so ``AutoModelForCausalLM.from_pretrained(run_dir / "student")`` works.
"""

from .conversion.modeling import (
    CaldStudentConfig,
    CaldStudentForCausalLM,
    ConversionConfig,
)
from .conversion.surgery import convert_teacher

__all__ = ["CaldStudentConfig", "CaldStudentForCausalLM", "ConversionConfig", "convert_teacher"]
__version__ = "0.1.0"
