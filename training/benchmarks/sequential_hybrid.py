"""A sequential hybrid built from FlowHN's own parts, the baseline FlowHN's parallel layers are compared with.

Blocks alternate: an attention block (pre-norm GQA attention with RoPE, then a SwiGLU MLP) then a DeltaNet block
(pre-norm parallel-flow DeltaNet, then a SwiGLU MLP), each block with its residuals, every token through every block,
no fusion. The blocks are `FlowHNBranch`es of attention and of DeltaNet with every token in place, so the
kernels, norms and MLPs are FlowHN's; only the wiring differs.

The config is a `FlowHNConfig` whose `num_hidden_layers` counts blocks (attention and DeltaNet blocks together):
`DynamicCache(config=...)` then holds one hybrid cache layer per block, the attention blocks using its key/value part
and the DeltaNet blocks its conv and recurrent state, so `generate()` works.
"""

import torch
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from flowhn_hf import FlowHNConfig
from flowhn_hf import count_parameters as flowhn_parameters
from flowhn_hf import modeling_flowhn as mf
from flowhn_hf.modeling_flowhn import (
    BranchTokens,
    FlowHNAttention,
    FlowHNBranch,
    FlowHNDeltaNet,
    FlowHNPreTrainedModel,
    FlowHNRMSNorm,
    FlowHNRotaryEmbedding,
)
from flowhn_hf.presets import MLP_MULTIPLE


class SequentialHybridModel(nn.Module):
    def __init__(self, config: FlowHNConfig):
        super().__init__()
        if config.num_hidden_layers % 2:
            raise ValueError(
                f"`num_hidden_layers` counts blocks and must be even (attention, DeltaNet, ...), got "
                f"{config.num_hidden_layers}"
            )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            FlowHNBranch(config, FlowHNAttention(config, i) if i % 2 == 0 else FlowHNDeltaNet(config, i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = FlowHNRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = FlowHNRotaryEmbedding(config)


class SequentialHybridForCausalLM(FlowHNPreTrainedModel, GenerationMixin):
    """Attention block, DeltaNet block, attention block, ... built from FlowHN's branches."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["FlowHNBranch"]

    def __init__(self, config: FlowHNConfig):
        super().__init__(config)
        self.model = SequentialHybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`past_key_values`: `cache` by the name transformers before 5.25 passes."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`")
        cache, use_cache = mf.given_cache(self.config, cache, past_key_values, use_cache)
        hidden_states = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        positions, real, _, documents = mf.token_positions(hidden_states, attention_mask, position_ids, cache)
        cache = mf.decoding_cache(self, cache, use_cache, documents)
        position_embeddings = self.model.rotary_emb(hidden_states, positions)
        tokens = BranchTokens(None, real, documents)  # every token in place; padding and documents marked

        hidden_states = mf.residual_stream(hidden_states, self.config.autocast_residual)
        for block in self.model.layers:
            hidden_states = block(hidden_states, tokens, position_embeddings, cache)
        if cache is not None:
            cache.flowhn_seen_tokens = getattr(cache, "flowhn_seen_tokens", 0) + positions.shape[1]
        hidden_states = self.model.norm(hidden_states)

        if labels is not None and self.training and torch.is_grad_enabled():  # FlowHN's loss without the logits
            loss = mf.causal_lm_loss(hidden_states, self.lm_head.weight, labels, kwargs.get("num_items_in_batch"))
            return CausalLMOutputWithPast(loss=loss, logits=None, **{mf.CACHE_NAME: cache})
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{mf.CACHE_NAME: cache})


def meta_parameters(model_class, config) -> int:
    """Parameters of `model_class(config)`, tied embeddings counted once, without allocating them."""
    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())


def count_parameters(config: FlowHNConfig) -> int:
    """Parameters of SequentialHybridForCausalLM(config), tied embeddings counted once, without allocating them."""
    return meta_parameters(SequentialHybridForCausalLM, config)


def matched_width(config_with, model_class, target_parameters: int):
    """`config_with(width)` for the SwiGLU width (a multiple of 64) that brings `model_class`'s parameter count
    closest to `target_parameters`: the count is linear in the width (as in `flowhn_hf.preset_config`)."""
    base = meta_parameters(model_class, config_with(MLP_MULTIPLE))
    step = meta_parameters(model_class, config_with(2 * MLP_MULTIPLE)) - base
    return config_with(max(1, round((target_parameters - base) / step) + 1) * MLP_MULTIPLE)


def sequential_config(flowhn_config: FlowHNConfig, target_parameters: int | None = None) -> FlowHNConfig:
    """The sequential hybrid of `flowhn_config`'s shapes: one attention block and one DeltaNet block per FlowHN layer,
    the SwiGLU width solved (to a multiple of 64) so the parameter count is closest to `target_parameters`
    (default: FlowHN's own count)."""
    if target_parameters is None:
        target_parameters = flowhn_parameters(flowhn_config)
    fields = flowhn_config.to_dict()
    keep = (
        "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "max_position_embeddings", "rope_theta", "rms_norm_eps", "initializer_range", "tie_word_embeddings",
        "delta_num_heads", "delta_head_dim", "delta_value_head_dim", "delta_rank", "delta_conv_size", "delta_beta_max",
    )  # fmt: skip
    fields = {k: fields[k] for k in keep if k in fields}
    fields.update(num_hidden_layers=2 * flowhn_config.num_hidden_layers, split_mode="none")

    def config_with(width):
        return FlowHNConfig(**fields, intermediate_size=width)

    return matched_width(config_with, SequentialHybridForCausalLM, target_parameters)
