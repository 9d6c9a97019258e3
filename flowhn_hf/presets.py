"""Named model sizes. The shapes are fixed; the MLP width is solved so the parameter count hits the target."""

import torch

from .configuration_flowhn import FlowHNConfig

# hidden size, layers, attention heads / KV heads, DeltaNet heads x head dim.
PRESETS = {
    "tiny": dict(
        vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, delta_num_heads=2, delta_head_dim=32, max_position_embeddings=512, split_period=32,
    ),
    "135m": dict(
        hidden_size=576, num_hidden_layers=15, num_attention_heads=9, num_key_value_heads=3, delta_num_heads=9,
        delta_head_dim=64, max_position_embeddings=2048,
    ),
    "350m": dict(
        hidden_size=1024, num_hidden_layers=14, num_attention_heads=16, num_key_value_heads=4, delta_num_heads=8,
        delta_head_dim=128, max_position_embeddings=2048,
    ),
    "1b": dict(
        hidden_size=2048, num_hidden_layers=12, num_attention_heads=32, num_key_value_heads=8, delta_num_heads=16,
        delta_head_dim=128, max_position_embeddings=2048,
    ),
}  # fmt: skip
TARGET_PARAMETERS = {"135m": 135e6, "350m": 350e6, "1b": 1.0e9}
MLP_MULTIPLE = 64


def preset_config(name: str, **overrides) -> FlowHNConfig:
    """The config of preset `name` ("tiny", "135m", "350m", "1b"), with any config field overridden.

    Unless `intermediate_size` is given, the sized presets solve it (to a multiple of 64) so that the model has the
    preset's parameter count whatever the split mode, fusion or DeltaNet shape: the parameter count is linear in it.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    if name not in TARGET_PARAMETERS or "intermediate_size" in overrides:
        return FlowHNConfig(**fields)
    base = count_parameters(FlowHNConfig(**{**fields, "intermediate_size": MLP_MULTIPLE}))
    step = count_parameters(FlowHNConfig(**{**fields, "intermediate_size": 2 * MLP_MULTIPLE})) - base
    multiples = max(1, round((TARGET_PARAMETERS[name] - base) / step) + 1)
    return FlowHNConfig(**{**fields, "intermediate_size": multiples * MLP_MULTIPLE})


def count_parameters(config: FlowHNConfig) -> int:
    """Parameters of FlowHNForCausalLM(config), tied embeddings counted once, without allocating them."""
    from .modeling_flowhn import FlowHNForCausalLM

    with torch.device("meta"):
        model = FlowHNForCausalLM(config)
    return sum(p.numel() for p in model.parameters())
