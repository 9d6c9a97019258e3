"""FlowHN for Hugging Face Transformers. Importing this package registers the `flowhn` model type with AutoConfig,
AutoModel and AutoModelForCausalLM."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .calibration import calibrate_split
from .configuration_flowhn import FlowHNConfig
from .modeling_flowhn import FlowHNForCausalLM, FlowHNModel, FlowHNPreTrainedModel
from .presets import PRESETS, count_parameters, preset_config

AutoConfig.register(FlowHNConfig.model_type, FlowHNConfig, exist_ok=True)
AutoModel.register(FlowHNConfig, FlowHNModel, exist_ok=True)
AutoModelForCausalLM.register(FlowHNConfig, FlowHNForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "FlowHNConfig",
    "FlowHNForCausalLM",
    "FlowHNModel",
    "FlowHNPreTrainedModel",
    "calibrate_split",
    "count_parameters",
    "preset_config",
]
