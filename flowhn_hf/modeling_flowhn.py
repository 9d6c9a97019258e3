"""FlowHN: a parallel hybrid causal LM. Every layer runs an attention branch and a parallel-flow DeltaNet branch side
by side on the same input and fuses their outputs (Moradi et al. 2025; Salvi & Muca Cirone 2025).

Tokens can be split between the branches. A token's branch is a function of its absolute position, its layer and the
config alone; each branch runs causally on the subsequence of tokens routed to it (gather, run, merge back), so the
model stays causal, padding-invariant, and incremental decoding reproduces a full forward pass.
"""

import inspect
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple

from .configuration_flowhn import FlowHNConfig

try:  # a Hub checkpoint carries the kernel modules flat beside this file
    from .cross_entropy import softmax_cross_entropy
    from .delta_rule import delta_rule
    from .short_conv import causal_conv, short_conv_silu
    from .utils import op_namespace
except ImportError:  # the installed package
    from flowhn_kernels import causal_conv, delta_rule, short_conv_silu, softmax_cross_entropy
    from flowhn_kernels.utils import op_namespace

# transformers 5.25 renamed the cache, as a forward's argument and as an output's field, from `past_key_values` to
# `cache`, and its generate passes the new name: FlowHN takes either, and fills the field the installed version has
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def given_cache(config, cache: Cache | None, past_key_values: Cache | None, use_cache: bool | None):
    """(the cache a forward was given, as `cache` or as `past_key_values`, its name before transformers 5.25, or None
    with `use_cache` off; `use_cache`, the config's where None)."""
    if past_key_values is not None:
        if cache is not None:
            raise ValueError("Pass the cache once: as `cache`, or as `past_key_values` (its name before transformers "
                             "5.25)")  # fmt: skip
        cache = past_key_values
    use_cache = config.use_cache if use_cache is None else use_cache
    return (cache if use_cache else None), use_cache


def decoding_cache(model: nn.Module, cache: Cache | None, use_cache: bool, documents: torch.Tensor | None):
    """`cache`, or a new DynamicCache where a next token will be decoded after this forward: `use_cache` on and none
    given, but not in a training step (no next token) nor for packed documents (no single next token)."""
    if use_cache and cache is None and not model.training and documents is None:
        return DynamicCache(config=model.config)
    return cache


# delta_rule's kernels are custom ops that torch.compile traces through; packed documents are the exception: their
# offsets are read on the host, and a compiled graph would be specialised on every batch's.
packed_delta_rule = torch.compiler.disable(delta_rule)


class FlowHNRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Llama's RMSNorm: in float32, the weight applied in the input dtype
        x = hidden_states.float()
        if torch.compiler.is_compiling():
            # torch's fused op reaches Inductor as aten._fused_rms_norm, which it calls as a CUDA kernel of its own
            # instead of fusing the norm with its neighbours; the formula it fuses
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        else:  # eager (decoding): one kernel where the formula takes six
            normed = F.rms_norm(x, x.shape[-1:], eps=self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)


class FlowHNRotaryEmbedding(nn.Module):
    """RoPE on absolute positions: cos and sin of shape (B, T, head_dim)."""

    def __init__(self, config: FlowHNConfig):
        super().__init__()
        self.register_buffer("inv_freq", self.inverse_frequencies(config), persistent=False)

    @staticmethod
    def inverse_frequencies(config: FlowHNConfig) -> torch.Tensor:
        dim = config.head_dim
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # compiled, an opaque op: Inductor would otherwise inline the cos and sin into every consumer, and each layer's
        # rotary would evaluate them again for each of its query and key heads, forward and backward; eager, the plain
        # function, without the op's dispatch on every decoding step
        cos_sin = rotary_cos_sin_op if torch.compiler.is_compiling() else rotary_cos_sin
        return cos_sin(position_ids, self.inv_freq.to(x.device), x.dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, head_dim) of the rotary angles at `position_ids` (B, T)."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


rotary_cos_sin_op = torch.library.custom_op(
    f"{op_namespace(__name__)}::rotary_cos_sin", rotary_cos_sin, mutates_args=()
)


@rotary_cos_sin_op.register_fake
def _(position_ids, inv_freq, dtype):
    shape = (*position_ids.shape, 2 * inv_freq.shape[0])
    return position_ids.new_empty(shape, dtype=dtype), position_ids.new_empty(shape, dtype=dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate q and k of shape (B, heads, T, head_dim) by cos and sin of shape (B, T, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, T, D) -> (B, kv_heads * n_rep, T, D)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, length, dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, length, dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, length, dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class FlowHNMLP(nn.Module):
    """SwiGLU, its gate and up projections one matrix product (`gate_up_proj`, as Phi-3's): one launch of twice the
    width where two would run, forward and backward."""

    def __init__(self, config: FlowHNConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matrix products run in: autocast's where it is on for x's device, else x's own."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def residual_stream(inputs_embeds: torch.Tensor, autocast_residual: bool) -> torch.Tensor:
    """The residual stream's first value: the embeddings, in autocast's dtype if `autocast_residual` (the config's)."""
    return inputs_embeds.to(matmul_dtype(inputs_embeds)) if autocast_residual else inputs_embeds


ALIGNED_MIN_ROWS = 128


def aligned_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x), its product widened to a multiple of 8 output features and cut back: rows that are not 16-byte
    aligned push cuBLAS off its Hopper kernels onto generic ones (sm75 `align1`), in the forward and both gradients
    (β's h·r = 9 features at the 135M size). Below ALIGNED_MIN_ROWS rows (decoding steps) the product is small
    whichever kernel runs it, and the pad would be one more launch a step. A wrapped linear (an adapter, a quantised
    layer) is called as it is."""
    pad = -linear.out_features % 8
    if pad == 0 or type(linear) is not nn.Linear or x.shape[:-1].numel() < ALIGNED_MIN_ROWS:
        return linear(x)
    bias = None if linear.bias is None else F.pad(linear.bias, (0, pad))
    return F.linear(x, F.pad(linear.weight, (0, 0, 0, pad)), bias)[..., : linear.out_features]


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, d) at the places `index` (B, n) along the token axis."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


@dataclass
class BranchTokens:
    """The tokens one branch of a layer takes, as a causal subsequence of the layer's input.

    `index` (B, n) holds their places in the input, in order (None: every token, in place); `valid` (B, n) is False
    at fillers: padding, or the places a row leaves empty because it routes fewer tokens here than another row
    (None: every entry is a real token); `documents` (B, n) numbers the packed documents the entries belong to (None:
    each row is one document).
    """

    index: torch.Tensor | None
    valid: torch.Tensor | None
    documents: torch.Tensor | None = None

    @property
    def size(self) -> int | None:
        return None if self.index is None else self.index.shape[1]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Select this branch's entries of x (B, T, d) along the token axis."""
        if self.index is None:
            return x
        return x[:, :0] if self.size == 0 else _gather_tokens(x, self.index)


class SplitTokens(torch.autograd.Function):
    """x (B, T, d) -> (its tokens at `first`, its tokens at `second`), when the two together hold every token once;
    `merge` (B, T) is each token's place in their concatenation. Backward is that merge, one gather, where autograd's
    gathers would scatter-add into zeros twice."""

    @staticmethod
    def forward(ctx, x, first, second, merge):
        ctx.save_for_backward(merge)
        return _gather_tokens(x, first), _gather_tokens(x, second)

    @staticmethod
    def backward(ctx, grad_first, grad_second):
        (merge,) = ctx.saved_tensors
        return _gather_tokens(torch.cat([grad_first, grad_second], dim=1), merge), None, None, None


class MergeTokens(torch.autograd.Function):
    """The inverse of SplitTokens on the concatenation of its two outputs: both (B, n₁ + n₂, ·) gathered at `merge`;
    backward gathers at `first` then `second` (the split), where autograd's gather would scatter-add into zeros."""

    @staticmethod
    def forward(ctx, both, merge, first, second):
        ctx.save_for_backward(first, second)
        return _gather_tokens(both, merge)

    @staticmethod
    def backward(ctx, grad):
        first, second = ctx.saved_tensors
        return _gather_tokens(grad, torch.cat([first, second], dim=1)), None, None, None


@dataclass
class LayerRoute:
    """How one layer splits its tokens: the two branches' subsequences, and where each token's output comes from
    in the concatenation of the attention outputs and the DeltaNet outputs (None when every token goes to both, or
    every token to one branch and none to the other). `permutes`: the two subsequences hold every token exactly
    once, with no fillers, so splitting and merging are each other's inverse (and each other's gradient)."""

    attention: BranchTokens
    deltanet: BranchTokens
    merge_index: torch.Tensor | None
    permutes: bool = False

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each branch's input: x (B, T, d) at the branch's tokens."""
        if self.permutes:
            return SplitTokens.apply(x, self.attention.index, self.deltanet.index, self.merge_index)
        return self.attention.gather(x), self.deltanet.gather(x)

    def merge(self, both: torch.Tensor) -> torch.Tensor:
        """(B, T, ·): each token's row of `both`, the attention branch's rows then the DeltaNet branch's, from the
        branch the token went to (fillers and padding read some row)."""
        if self.permutes:
            return MergeTokens.apply(both, self.merge_index, self.attention.index, self.deltanet.index)
        if both.shape[1] == 0:  # nothing but padding
            both = both.new_zeros(both.shape[0], 1, both.shape[2])
        return _gather_tokens(both, self.merge_index)


class AttentionWindow(NamedTuple):
    """One layer's routing: the positions p with (p - offset) mod period < width go to attention, the others to
    DeltaNet; width = period means every token goes to both (split_mode "none")."""

    offset: int
    width: int
    period: int

    def routes(self, positions: torch.Tensor) -> torch.Tensor:
        """True where the token at absolute position `positions` goes to attention."""
        return (positions - self.offset) % self.period < self.width

    def below(self, m: int) -> int:
        """How many of the positions offset, ..., offset + m - 1 go to attention (negative m by periodicity)."""
        return (m // self.period) * self.width + min(m % self.period, self.width)

    def count(self, start: int, length: int) -> int:
        """How many of the positions start, ..., start + length - 1 go to attention."""
        return self.below(start + length - self.offset) - self.below(start - self.offset)

    def places(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(attention places, DeltaNet places, merge) of the positions start, ..., start + length - 1, in order, with
        merge each token's place in the two lists joined: what a stable sort of the routes and a running count
        would give, in closed form, so that each is one elementwise kernel under torch.compile (the sort and the
        count took ~50 µs a layer in FAC's step)."""
        period, width = self.period, self.width
        shift = start - self.offset
        attention_before = self.below(shift)
        deltanet_before = shift - attention_before
        to_attention = self.count(start, length)
        j = torch.arange(length, device=device)
        rank = attention_before + j[:to_attention]  # the k-th attention place of the whole period pattern
        attention = (rank // width) * period + rank % width - shift
        rank = deltanet_before + j[: length - to_attention]
        deltanet = (rank // (period - width)) * period + width + rank % (period - width) - shift
        m = shift + j
        below = (m // period) * width + (m % period).clamp(max=width)
        merge = torch.where(m % period < width, below - attention_before, to_attention + m - below - deltanet_before)
        return attention, deltanet, merge


def attention_window(layer_idx: int, config: FlowHNConfig) -> AttentionWindow:
    """The routing of layer `layer_idx`: a function of the config alone, worked out once when the model is built."""
    period = config.split_period
    if config.split_mode == "none":
        return AttentionWindow(0, period, period)
    if config.split_mode == "alternating":
        half = period // 2
        return AttentionWindow(0, half, period) if layer_idx % 2 == 0 else AttentionWindow(half, period - half, period)
    width = min(period - 1, max(1, round(config.resolved_attention_ratio * period)))
    if config.split_mode == "flop_aware":
        return AttentionWindow(0, width, period)
    # Circulating: consecutive windows tile the period, a lap of ⌈P / width⌉ layers, and each lap starts half a
    # window further on. Without that shift a width near P/2 makes consecutive layers swap the same two halves, and a
    # band of earlier tokens never shares a branch with a token at any depth (training/benchmarks/NOTES.md, "FAC's
    # blind spot"); with it every token reaches every later one within five layers, at any ratio.
    lap = -(-period // width)
    return AttentionWindow((layer_idx * width + (layer_idx // lap) * (width // 2)) % period, width, period)


def _compact(selected: torch.Tensor, documents: torch.Tensor | None) -> BranchTokens:
    """The selected places of each row, in order, then fillers up to the longest row."""
    count = selected.sum(1)
    size = int(count.max()) if selected.numel() else 0
    index = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :size]
    valid = torch.arange(size, device=selected.device)[None, :] < count[:, None]
    return BranchTokens(index, valid, None if documents is None else documents.gather(1, index))


def plan_route(
    window: AttentionWindow,
    positions: torch.Tensor,
    real: torch.Tensor | None,
    start: int | None,
    documents: torch.Tensor | None = None,
) -> LayerRoute:
    """Split a layer's tokens between the branches.

    `positions` (B, T) are absolute positions, `real` (B, T) False at padding (None: no padding), `documents` (B, T)
    numbers packed documents (None: one per row). When every row has the positions `start, start + 1, ...` and no
    padding, the split is worked out on the host, with no device sync.
    """
    if window.width == window.period:
        everything = BranchTokens(None, real, documents)
        return LayerRoute(everything, everything, None)
    batch, length = positions.shape
    if start is not None:
        attention_size = window.count(start, length)
        if attention_size in (0, length):
            # every token to one branch, in place (a decoding step): nothing to gather, route or merge
            everything, nothing = BranchTokens(None, None), BranchTokens(positions.new_empty(batch, 0), None)
            return LayerRoute(everything, nothing, None) if attention_size else LayerRoute(nothing, everything, None)
        # Every row alike: the places follow from the host's start and length alone, built on the device, so neither
        # side waits for the other.
        attention, deltanet, merge = (t.expand(batch, -1) for t in window.places(start, length, positions.device))
        return LayerRoute(BranchTokens(attention, None), BranchTokens(deltanet, None), merge, permutes=True)
    to_attention = window.routes(positions)
    to_deltanet = ~to_attention
    if real is not None:
        to_attention, to_deltanet = to_attention & real, to_deltanet & real
    if length == 1:
        # Decoding rows that disagree: each branch takes the one place, a filler where the token went to the other
        # branch; sizing the branches by their counts would cost two host syncs a layer at every step.
        place = torch.zeros_like(positions)
        attention = BranchTokens(place, to_attention, documents)
        deltanet = BranchTokens(place, to_deltanet, documents)
    else:
        attention, deltanet = _compact(to_attention, documents), _compact(to_deltanet, documents)
    rank_attention = to_attention.cumsum(-1) - 1
    rank_deltanet = to_deltanet.cumsum(-1) - 1 + attention.size
    merge = torch.where(to_attention, rank_attention, rank_deltanet).clamp(min=0)
    return LayerRoute(attention, deltanet, merge.expand(batch, -1))


class FlowHNAttention(nn.Module):
    """GQA attention over the tokens routed to it. Its KV cache holds only those tokens; `key_mask` records which
    cached entries are fillers."""

    is_causal = True

    def __init__(self, config: FlowHNConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.qkv_heads = (config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        tokens: BranchTokens,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        valid = tokens.valid
        position_embeddings = tuple(tokens.gather(e) for e in position_embeddings)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        qkv = self.qkv_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query_states, key_states, value_states = qkv.split(self.qkv_heads, dim=1)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, *position_embeddings)

        key_mask = valid
        past_length = 0
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
            past_length = key_states.shape[-2] - input_shape[1]
            layer = cache.layers[self.layer_idx]
            # the record of fillers starts with the first one; until then (no padding) every cached key is real
            past_mask = getattr(layer, "key_mask", None)
            if past_mask is not None or (valid is not None and past_length):
                ones = partial(torch.ones, dtype=torch.bool, device=key_states.device)
                past = ones(input_shape[0], past_length) if past_mask is None else past_mask
                key_mask = torch.cat([past, ones(input_shape) if valid is None else valid], dim=1)
            layer.key_mask = key_mask

        attention_mask = None
        # one new token over a cache of real keys needs no mask; several do (causality within them)
        needs_mask = key_mask is not None or tokens.documents is not None or (past_length and input_shape[1] > 1)
        if needs_mask or self.config._attn_implementation != "sdpa":
            attention_mask = _causal_mask(key_mask, tokens.documents, input_shape, past_length, query_states)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())


def _causal_mask(key_mask, documents, input_shape, past_length, query_states) -> torch.Tensor:
    """Additive (B, 1, n, past + n) mask: causal within the branch's subsequence and within each packed document,
    fillers never attended."""
    batch, length = input_shape
    device = query_states.device
    keys = torch.arange(past_length + length, device=device)
    allowed = keys[None, :] <= (past_length + torch.arange(length, device=device))[:, None]
    allowed = allowed[None].expand(batch, -1, -1)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    if documents is not None:  # packed documents come without a cache, so past_length is 0
        allowed = allowed & (documents[:, :, None] == documents[:, None, :])
    mask = torch.zeros(allowed.shape, dtype=query_states.dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(query_states.dtype).min)[:, None]


def _linear_states(layer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(conv window, recurrent state) held by a hybrid cache layer, None before its first update."""
    conv, recurrent = layer.conv_states, layer.recurrent_states
    if isinstance(conv, dict):  # transformers >= 5.14 keeps several numbered states per layer
        conv, recurrent = conv[0], recurrent[0]
    return conv, recurrent


def document_offsets(documents: torch.Tensor) -> torch.Tensor:
    """`cu_seqlens` of the rows' documents (B, n) laid end to end: where a row or a document starts, and the end."""
    starts = F.pad(documents[:, 1:] != documents[:, :-1], (1, 0), value=True)
    offsets = starts.flatten().nonzero().squeeze(1)
    return torch.cat([offsets, offsets.new_tensor([documents.numel()])])


class FlowHNDeltaNet(nn.Module):
    """Parallel-flow DeltaNet with rank-R corrections: short causal conv, L2-normalised q and k, bounded β, and a
    gated RMSNorm on the output. Padding and fillers get β = 0 and zero input, so they never change the state."""

    def __init__(self, config: FlowHNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.delta_num_heads
        self.key_dim = config.delta_head_dim
        self.value_dim = config.delta_value_head_dim
        self.rank = config.delta_rank
        self.conv_size = config.delta_conv_size
        self.beta_max = config.delta_beta_max
        h, k, v, r = self.num_heads, self.key_dim, self.value_dim, self.rank
        self.split_sizes = (h * k, h * r * k, h * r * v)
        channels = sum(self.split_sizes)
        self.qkv_proj = nn.Linear(config.hidden_size, channels, bias=False)
        self.conv1d = nn.Conv1d(channels, channels, self.conv_size, groups=channels, bias=False)
        self.b_proj = nn.Linear(config.hidden_size, h * r, bias=False)
        self.g_proj = nn.Linear(config.hidden_size, h * v, bias=False)
        self.o_norm = FlowHNRMSNorm(v, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(h * v, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        tokens: BranchTokens,
        position_embeddings=None,  # positions enter through the recurrence's order, not through rotations
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        if tokens.valid is not None:
            hidden_states = hidden_states * tokens.valid[..., None].to(hidden_states.dtype)
        layer = None if cache is None else cache.layers[self.layer_idx]
        conv_window, state = (None, None) if layer is None else _linear_states(layer)

        x = self.qkv_proj(hidden_states)
        if layer is None:  # q and the keys leave the conv's kernel at unit length
            unit = (self.split_sizes[0] + self.split_sizes[1], self.key_dim)
            qkv = short_conv_silu(x, self.conv1d.weight, tokens.documents, unit_groups=unit)
        else:  # decoding: the cached inputs before the first token lead (the cache keeps time on its last axis)
            if conv_window is None:
                conv_window = x.new_zeros(batch, x.shape[2], self.conv_size - 1)
            x = torch.cat([conv_window.to(x.dtype), x.transpose(1, 2)], dim=2)
            qkv = F.silu(causal_conv(x.transpose(1, 2), self.conv1d.weight))
            layer.update_conv_state(self._last_inputs(x, tokens.valid))
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        # while decoding, q and k are L2-normalised by the kernel call (normalize_qk): in the decoding kernel itself,
        # saving the launches that F.normalize would take at every token; the kernel takes q, k and v in one dtype
        q = q.view(batch, length, self.num_heads, self.key_dim)
        k = k.view(batch, length, self.num_heads, self.rank, self.key_dim)
        v = v.reshape(batch, length, self.num_heads, self.rank, self.value_dim)
        beta = aligned_linear(self.b_proj, hidden_states).sigmoid().view(batch, length, self.num_heads, self.rank)
        beta = beta * (self.beta_max / self.rank)
        if tokens.valid is not None:
            beta = beta * tokens.valid[..., None, None].to(beta.dtype)

        if tokens.documents is None:
            o, final_state = delta_rule(q, k, v, beta, initial_state=state, output_final_state=layer is not None,
                                        normalize_qk=layer is not None)
        else:  # the rows' documents packed along one sequence, the state reset at each
            packed = (t.flatten(0, 1)[None] for t in (q, k, v, beta))
            o = packed_delta_rule(*packed, cu_seqlens=document_offsets(tokens.documents))[0].view(v.shape[:3] + (-1,))
        if layer is not None:
            layer.update_recurrent_state(final_state)

        gate = F.silu(self.g_proj(hidden_states)).view(batch, length, self.num_heads, self.value_dim)
        o = self.o_norm(o) * gate
        return self.o_proj(o.reshape(batch, length, -1))

    def _last_inputs(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """The conv inputs of each row's last `conv_size - 1` real tokens (x starts with the previous window): the
        window the next token's conv needs."""
        width = self.conv_size - 1
        if valid is None:
            return x[:, :, x.shape[2] - width :].contiguous()
        real = torch.cat([valid.new_ones(valid.shape[0], width), valid], dim=1)
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
        index = order.gather(1, real.sum(1, keepdim=True) - width + torch.arange(width, device=x.device))
        return x.gather(2, index[:, None, :].expand(-1, x.shape[1], -1))


class FlowHNBranch(nn.Module):
    """One branch of a layer, on the tokens routed to it: a pre-norm mixer (attention or DeltaNet) then a SwiGLU MLP,
    each with its residual."""

    def __init__(self, config: FlowHNConfig, mixer: nn.Module):
        super().__init__()
        self.input_layernorm = FlowHNRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = mixer
        self.post_mixer_layernorm = FlowHNRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = FlowHNMLP(config)

    def forward(self, hidden_states, tokens: BranchTokens, position_embeddings, cache=None, **kwargs):
        """`hidden_states`: the branch's tokens only (`LayerRoute.split`)."""
        mixed = self.mixer(self.input_layernorm(hidden_states), tokens, position_embeddings, cache, **kwargs)
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.post_mixer_layernorm(hidden_states))


class FlowHNFusion(nn.Module):
    """Merge the branch outputs m back into the residual stream: u = x + W_b m, y = u + W_f RMSNorm(u).

    `linear`: m is the concatenation of both branch outputs when every token goes to both (W_b is 2d -> d), else the
    token's one branch output. `normalized_mean`: m is the mean of the token's RMS-normalised, per-channel scaled
    branch outputs (W_b is d -> d either way).
    """

    def __init__(self, config: FlowHNConfig):
        super().__init__()
        d = config.hidden_size
        self.normalized = config.fusion == "normalized_mean"
        both = config.split_mode == "none" and not self.normalized
        if self.normalized:
            self.attention_norm = FlowHNRMSNorm(d, eps=config.rms_norm_eps)
            self.deltanet_norm = FlowHNRMSNorm(d, eps=config.rms_norm_eps)
        self.branch_proj = nn.Linear(2 * d if both else d, d, bias=False)
        self.fusion_norm = FlowHNRMSNorm(d, eps=config.rms_norm_eps)
        self.fusion_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, attention_out: torch.Tensor, deltanet_out: torch.Tensor, route: LayerRoute):
        if self.normalized:
            attention_out, deltanet_out = self.attention_norm(attention_out), self.deltanet_norm(deltanet_out)
        if route.merge_index is not None:
            # W_b acts on each token alone, so it runs before the merge, over both branches' rows at once; the merge
            # then moves its outputs inside the residual add's kernel. Cast before the concatenation, the branches
            # write 16-bit rows (under autocast) straight into it, where autocast would cast an fp32 concatenation.
            dtype = matmul_dtype(x)
            both = torch.cat([attention_out.to(dtype), deltanet_out.to(dtype)], dim=1)
            projected = route.merge(self.branch_proj(both))
        elif 0 in (attention_out.shape[1], deltanet_out.shape[1]):  # one branch took every token
            projected = self.branch_proj(deltanet_out if attention_out.shape[1] == 0 else attention_out)
        elif self.normalized:
            projected = self.branch_proj((attention_out + deltanet_out) / 2)
        else:
            projected = self.branch_proj(torch.cat([attention_out, deltanet_out], -1))
        u = x + projected
        return u + self.fusion_proj(self.fusion_norm(u))


class FlowHNDecoderLayer(GradientCheckpointingLayer):
    """Both branches on the same input, then the fusion. A branch that gets no token is skipped."""

    def __init__(self, config: FlowHNConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.attention_branch = FlowHNBranch(config, FlowHNAttention(config, layer_idx))
        self.deltanet_branch = FlowHNBranch(config, FlowHNDeltaNet(config, layer_idx))
        self.fusion = FlowHNFusion(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        route: LayerRoute,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attention_out, deltanet_out = route.split(hidden_states)
        if route.attention.size != 0:
            attention_out = self.attention_branch(
                attention_out, route.attention, position_embeddings, cache, **kwargs
            )
        if route.deltanet.size != 0:
            deltanet_out = self.deltanet_branch(deltanet_out, route.deltanet, position_embeddings, cache)
        return self.fusion(hidden_states, attention_out, deltanet_out, route)


class FlowHNPreTrainedModel(PreTrainedModel):
    config_class = FlowHNConfig
    config: FlowHNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlowHNDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _is_stateful = True  # the DeltaNet state can't be rolled back: no assisted decoding

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, plus the modeling code flat beside the weights (this file, the configuration and the
        kernel modules), so the folder loads with `trust_remote_code=True` where flowhn is not installed."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for source in code_files():
                shutil.copy(source, Path(save_directory) / source.name)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FlowHNRotaryEmbedding):
            module.inv_freq.copy_(FlowHNRotaryEmbedding.inverse_frequencies(self.config))


def code_files() -> list[Path]:
    """The files a checkpoint needs to run this model without the package: they import each other relatively."""
    kernel_dir = Path(inspect.getfile(delta_rule)).parent
    kernels = [path for path in sorted(kernel_dir.glob("*.py")) if path.name != "__init__.py"]
    here = [Path(__file__), Path(inspect.getfile(FlowHNConfig))]
    return list(dict.fromkeys(here + kernels))


def token_positions(inputs_embeds, attention_mask, position_ids, cache):
    """Absolute positions (B, T) of the input tokens; the real-token mask (None: no padding); `start` when every
    row has the positions start, start + 1, ... and no padding (else None); and document numbers (B, T) when
    `position_ids` restart inside a row between real tokens, as for packed documents (else None)."""
    batch, length = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"`attention_mask` must be 2D (batch, past + new tokens), got {attention_mask.dim()}D")
    real = None
    if attention_mask is not None:
        real = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
    if position_ids is None and attention_mask is None:  # every row counts on from the cache: known on the host
        seen = getattr(cache, "flowhn_seen_tokens", 0) if cache is not None else 0
        return torch.arange(seen, seen + length, device=device).expand(batch, -1), None, seen, None
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    positions = position_ids.to(device).expand(batch, -1)
    steps = positions[:, :1] + torch.arange(length, device=device)
    uniform = (positions == steps).all() & (positions[:, :1] == positions[:1, :1]).all()
    continues = positions[:, 1:] == positions[:, :-1] + 1
    if real is not None:
        uniform = uniform & real.all()
        continues = continues | ~(real[:, 1:] & real[:, :-1])  # only a step between real tokens starts a document
    flags = torch.stack([uniform.long(), continues.all().long(), positions[0, 0]])
    uniform, unpacked, start = flags.tolist()  # the one device sync of a forward given a mask or positions
    documents = None if unpacked else F.pad(~continues, (1, 0)).cumsum(1)
    return positions, None if uniform else real, start if uniform else None, documents


class FlowHNModel(FlowHNPreTrainedModel):
    def __init__(self, config: FlowHNConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(FlowHNDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = FlowHNRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = FlowHNRotaryEmbedding(config)
        # routing is fixed by the config the model is built from
        self.attention_windows = [attention_window(i, config) for i in range(config.num_hidden_layers)]
        self.gradient_checkpointing = False
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`past_key_values`: `cache` by the name transformers before 5.25 passes."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`")
        cache, use_cache = given_cache(self.config, cache, past_key_values, use_cache)
        if kwargs.get("output_attentions", self.config.output_attentions):
            raise ValueError(
                "`output_attentions=True` is not supported: a layer's attention sees only the tokens routed to it, "
                "so there is no (tokens x tokens) map to return; leave `output_attentions` False"
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if cache is not None and len(cache.layers) != self.config.num_hidden_layers:
            raise ValueError(
                "`cache` must hold one hybrid layer per decoder layer: pass "
                "`DynamicCache(config=model.config)`"
            )
        positions, real, start, documents = token_positions(
            inputs_embeds, attention_mask, position_ids, cache
        )
        if documents is not None and cache is not None:
            raise ValueError(
                "`position_ids` restart inside a row (packed documents), which a `cache` can't "
                "continue: pass packed documents without a cache"
            )
        cache = decoding_cache(self, cache, use_cache, documents)

        position_embeddings = self.rotary_emb(inputs_embeds, positions)
        hidden_states = residual_stream(inputs_embeds, self.config.autocast_residual)
        # as in transformers: the embeddings, then every layer's output, the last one after the final norm
        if self.config.output_hidden_states if output_hidden_states is None else output_hidden_states:
            all_hidden_states = [hidden_states]
        else:
            all_hidden_states = None
        for layer_idx, decoder_layer in enumerate(self.layers):
            route = plan_route(self.attention_windows[layer_idx], positions, real, start, documents)
            hidden_states = decoder_layer(
                hidden_states,
                route=route,
                position_embeddings=position_embeddings,
                cache=cache,
                **kwargs,
            )
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
        if cache is not None:
            cache.flowhn_seen_tokens = getattr(cache, "flowhn_seen_tokens", 0) + positions.shape[1]
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states[-1] = hidden_states
            all_hidden_states = tuple(all_hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_NAME: cache}
        )


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `labels` (-100 ignored), over chunks of tokens.

    The gradients are worked out chunk by chunk during the forward, so the (tokens x vocab) logits never exist at
    once and nothing is recomputed: for the 49,152-word vocabulary that is gigabytes of activations per step. Each
    chunk's loss and logit gradient come from one kernel (`softmax_cross_entropy`). The forward writes nothing in
    place: under torch.compile, torch 2.11 traced in-place writes into tensors made here as if they never happened,
    and the model trained on zero gradients (CUDA, every backend; tests/test_model_gpu.py).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        dtype = matmul_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            losses, grad_rows, grad_weight = [], [], 0
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                grad, loss = softmax_cross_entropy(h[rows] @ w.T, labels[rows])
                losses.append(loss.sum())
                grad_rows.append(grad @ w)
                grad_weight = grad_weight + (grad.T @ h[rows]).float()
        ctx.save_for_backward(torch.cat(grad_rows).to(hidden.dtype), grad_weight.to(weight.dtype))
        return torch.stack(losses).sum()

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, grad_weight * grad_total, None, None


def causal_lm_loss(hidden_states, weight, labels, num_items_in_batch=None, chunk_size=2048):
    """transformers' causal-LM loss (labels shifted left, -100 ignored, summed over `num_items_in_batch` or averaged
    over the counted tokens) of `hidden_states @ weight.T`, without materialising the logits."""
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(hidden_states.device)
    total = LinearCrossEntropy.apply(hidden_states.reshape(-1, hidden_states.shape[-1]), weight, labels, chunk_size)
    count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device)


class FlowHNForCausalLM(FlowHNPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FlowHNConfig):
        super().__init__(config)
        self.model = FlowHNModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`past_key_values`: `cache` by the name transformers before 5.25 passes."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = loss = None
        if labels is not None and self.training and torch.is_grad_enabled():
            # Training needs the loss, not the logits: skip the (tokens x vocab) logits altogether.
            loss = causal_lm_loss(hidden_states, self.lm_head.weight, labels, kwargs.get("num_items_in_batch"))
        else:
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, slice_indices, :])
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, refusing beam search (reordering beams would have to reorder the record of
        which cached keys are fillers, which the cache does not carry) and caches other than the dynamic one (the
        DeltaNet branch keeps a recurrent state and a conv window beside the attention keys and values)."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or generation_config.num_beams or 1) > 1:
            raise ValueError("FlowHN does not support beam search: use `num_beams=1` (greedy or sampling)")
        implementation = kwargs.get("cache_implementation") or generation_config.cache_implementation
        if implementation not in (None, "dynamic"):
            raise ValueError(f"`cache_implementation` must be 'dynamic' (or unset) for FlowHN, got {implementation!r}")
        return super().generate(*args, **kwargs)


__all__ = ["FlowHNForCausalLM", "FlowHNModel", "FlowHNPreTrainedModel"]
