"""The FineViT model: nn.Modules that call fineviti.ops.

create_model(preset) -> the stage-1 two-tower model (FineViT: .visual, .text, encode_image, encode_text);
create_aligner(preset) -> the stage-2 aligner; presets "tiny", "base", "large", "fine" (fineviti.model.config);
count_flops(config, image_seqlens, text_seqlens) -> FLOPs of a step (fineviti.model.flops).
"""

from fineviti.model.aligner import Aligner, BuiltinLM, HFCausalLM, build_example, collate, create_aligner
from fineviti.model.config import (
                                   PRESETS,
                                   AlignerConfig,
                                   BuiltinLMConfig,
                                   ModelConfig,
                                   TextConfig,
                                   VisionConfig,
                                   apply_overrides,
                                   preset,
)
from fineviti.model.flops import FlopCount, count_flops
from fineviti.model.text import TextTower
from fineviti.model.two_tower import FineViT, create_model, resolve_config
from fineviti.model.vision import VisionTower

__all__ = ["PRESETS", "Aligner", "AlignerConfig", "BuiltinLM", "BuiltinLMConfig", "FineViT", "FlopCount",
           "HFCausalLM", "ModelConfig", "TextConfig", "TextTower", "VisionConfig", "VisionTower", "apply_overrides",
           "build_example", "collate", "count_flops", "create_aligner", "create_model", "preset", "resolve_config"]
