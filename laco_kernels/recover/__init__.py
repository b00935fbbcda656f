"""Recovery of pruned models: LaCo layer-wise compensation and the LoRA baseline.

    from laco_kernels.recover import layerwise, lora
    result = layerwise(dense_model, pruned_model, calibration_ids)          # masks kept exactly
    adapted = lora(pruned_model, calibration_ids)                           # peft baseline
"""
from .layerwise import LayerwiseConfig, LayerwiseResult, layerwise
from .lora import LoraResult, lora

__all__ = ["LayerwiseConfig", "LayerwiseResult", "LoraResult", "layerwise", "lora"]
