"""FlowHN configuration: a parallel hybrid causal LM with an attention and a DeltaNet branch in every layer."""

import math

from transformers import PretrainedConfig

SPLIT_MODES = ("none", "alternating", "flop_aware", "flop_aware_circulating")
FUSIONS = ("linear", "normalized_mean")
# Where a Hub checkpoint's flat code files define the classes (see FlowHNPreTrainedModel.save_pretrained).
AUTO_MAP = {
    "AutoConfig": "configuration_flowhn.FlowHNConfig",
    "AutoModel": "modeling_flowhn.FlowHNModel",
    "AutoModelForCausalLM": "modeling_flowhn.FlowHNForCausalLM",
}
# Chunk length of the chunked DeltaNet kernels, used by the FLOP cost model.
DELTA_CHUNK_SIZE = 64


class FlowHNConfig(PretrainedConfig):
    r"""Configuration of a FlowHN model.

    The Transformers names mean what they mean for Llama. FlowHN's own fields:

    - `split_mode`: how tokens are routed between the two branches of a layer: `"none"` (every token to both),
      `"alternating"` (half of each period each, swapped between even and odd layers), `"flop_aware"` (a fraction
      `attention_ratio` of each period to attention, the same window in every layer), `"flop_aware_circulating"`
      (that window moves to a new place in each layer).
    - `split_period`: the period P, in tokens, of the routing pattern. A token's branch depends only on its absolute
      position modulo P, its layer and this config. The default 256 gave the lower loss at the small size on the GPU
      (FAC's eval loss 5.330 against 5.433 at P = 2048, the training length; training/benchmarks/QUALITY.md).
    - `attention_ratio`: the fraction of tokens routed to attention by the FLOP-aware modes; `"auto"` solves the FLOP
      cost model (see `attention_ratio_from_cost_model`) for a sequence of `max_position_embeddings` tokens.
    - `delta_num_heads`, `delta_head_dim` (key size K), `delta_value_head_dim` (value size V), `delta_rank` (R rank-one
      corrections per token; 1 is DeltaNet), `delta_conv_size` (short causal convolution width), `delta_beta_max`
      (each token's corrections sum to at most this; 2 allows negative eigenvalues of the state transition).
    - `fusion`: `"linear"` (concatenated branch outputs through a linear map) or `"normalized_mean"` (mean of the
      RMS-normalised, per-channel scaled branch outputs, then a linear map).
    - `autocast_residual`: under autocast, carry the residual stream (the embeddings, every layer's output) in
      autocast's 16-bit dtype, as a model with 16-bit parameters does, instead of the float32 of the parameters. It
      halves the bytes the norms and residual adds move. Outside autocast it changes nothing.
    """

    model_type = "flowhn"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the cache's name from transformers 5.25, and before

    def __init__(
        self,
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=16,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=None,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        layer_types=None,
        split_mode="flop_aware_circulating",
        split_period=256,
        attention_ratio="auto",
        delta_num_heads=None,
        delta_head_dim=64,
        delta_value_head_dim=None,
        delta_rank=1,
        delta_conv_size=4,
        delta_beta_max=1.0,
        fusion="linear",
        autocast_residual=True,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        self.layer_types = ["hybrid"] * num_hidden_layers if layer_types is None else list(layer_types)
        self.split_mode = split_mode
        self.split_period = split_period
        self.attention_ratio = attention_ratio
        self.delta_head_dim = delta_head_dim
        self.delta_value_head_dim = delta_head_dim if delta_value_head_dim is None else delta_value_head_dim
        self.delta_rank = delta_rank
        self.delta_conv_size = delta_conv_size
        self.delta_beta_max = delta_beta_max
        self.fusion = fusion
        self.autocast_residual = autocast_residual
        self.use_cache = use_cache
        if head_dim is None and _is_int(hidden_size) and _is_int(num_attention_heads) and num_attention_heads > 0:
            self.head_dim = hidden_size // num_attention_heads
        self.delta_num_heads = delta_num_heads
        if delta_num_heads is None and _is_int(hidden_size) and _is_int(delta_head_dim) and delta_head_dim > 0:
            self.delta_num_heads = max(1, hidden_size // delta_head_dim)
        self._validate()
        kwargs.setdefault("auto_map", AUTO_MAP)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self):
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "delta_num_heads",
        ):  # fmt: skip
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if not _is_int(self.delta_conv_size) or self.delta_conv_size < 2:
            raise ValueError(f"`delta_conv_size` must be an integer >= 2, got {self.delta_conv_size!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for rotary embeddings, got {self.head_dim}")
        for name in ("delta_head_dim", "delta_value_head_dim"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= 256:
                raise ValueError(f"`{name}` must be an integer from 1 to 256 (the kernels' limit), got {value!r}")
        if not _is_int(self.delta_rank) or not 1 <= self.delta_rank <= 4:
            raise ValueError(f"`delta_rank` must be an integer from 1 to 4, got {self.delta_rank!r}")
        if not _is_number(self.delta_beta_max) or not 0 < self.delta_beta_max <= 2:
            raise ValueError(
                f"`delta_beta_max` must be in (0, 2] (2 allows negative eigenvalues), got {self.delta_beta_max!r}"
            )
        for name in ("rope_theta", "rms_norm_eps"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {getattr(self, name)!r}")
        if not _is_number(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(f"`initializer_range` must be a number >= 0, got {self.initializer_range!r}")
        if not _is_number(self.attention_dropout) or not 0 <= self.attention_dropout < 1:
            raise ValueError(f"`attention_dropout` must be in [0, 1), got {self.attention_dropout!r}")
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) != {"hybrid"}:
            raise ValueError(
                f"`layer_types` must be {self.num_hidden_layers} times 'hybrid' (every FlowHN layer holds an attention "
                f"and a DeltaNet branch), got {self.layer_types!r}"
            )
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"`split_mode` must be one of {SPLIT_MODES}, got {self.split_mode!r}")
        if not _is_int(self.split_period) or self.split_period < 2:
            raise ValueError(f"`split_period` must be an integer >= 2, got {self.split_period!r}")
        if self.attention_ratio != "auto" and (
            not _is_number(self.attention_ratio) or not 0 < self.attention_ratio < 1
        ):
            raise ValueError(f"`attention_ratio` must be 'auto' or a number in (0, 1), got {self.attention_ratio!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"`fusion` must be one of {FUSIONS}, got {self.fusion!r}")
        if not isinstance(self.autocast_residual, bool):
            raise ValueError(f"`autocast_residual` must be True or False, got {self.autocast_residual!r}")

    # The FLOP cost model that balances the two branches (forward FLOPs per routed token).
    def attention_flops_per_token(self, context: float) -> float:
        """Attention branch: projections, the SwiGLU MLP, and QK/AV over `context` earlier keys."""
        d, hd = self.hidden_size, self.head_dim
        proj = 2 * d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        return proj + 6 * d * self.intermediate_size + 4 * self.num_attention_heads * hd * context

    def deltanet_flops_per_token(self) -> float:
        """DeltaNet branch: projections, short conv, the chunked flow computation and the SwiGLU MLP."""
        d, h, k, v, r, c = (
            self.hidden_size, self.delta_num_heads, self.delta_head_dim, self.delta_value_head_dim,
            self.delta_rank, DELTA_CHUNK_SIZE,
        )  # fmt: skip
        conv_channels = h * (k + r * k + r * v)
        proj = 2 * d * (conv_channels + h * r + h * v) + 2 * h * v * d
        # UT transform (KKᵀ, W, U), state in/out products and the output, per token and head, in MACs.
        chunk = r * r * c * (2 * k + v) / 2 + 2 * r * k * v + k * v + r * c * (k + v) / 2
        return proj + 2 * self.delta_conv_size * conv_channels + 2 * h * chunk + 6 * d * self.intermediate_size

    def attention_ratio_from_cost_model(self, seq_len: int | None = None) -> float:
        """The fraction ρ of tokens for attention that makes both branches cost the same over `seq_len` tokens.

        Attention over ρT tokens costs ρT·(a + 4·H·hd·ρT/2) and DeltaNet over (1−ρ)T tokens (1−ρ)T·c, so ρ solves
        2·H·hd·T·ρ² + (a + c)·ρ − c = 0.
        """
        seq_len = self.max_position_embeddings if seq_len is None else seq_len
        a, c = self.attention_flops_per_token(0), self.deltanet_flops_per_token()
        q = 2 * self.num_attention_heads * self.head_dim * seq_len
        return (-(a + c) + math.sqrt((a + c) ** 2 + 4 * q * c)) / (2 * q)

    @property
    def resolved_attention_ratio(self) -> float:
        """The fraction of each period routed to attention."""
        if self.split_mode == "none":
            return 1.0
        if self.split_mode == "alternating":
            return 0.5
        if self.attention_ratio == "auto":
            return self.attention_ratio_from_cost_model()
        return float(self.attention_ratio)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["FlowHNConfig"]
