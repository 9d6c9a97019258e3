"""Calibrate the token split by timing the two branches on the actual device."""

import time

import torch

from .configuration_flowhn import FlowHNConfig
from .modeling_flowhn import BranchTokens, FlowHNAttention, FlowHNBranch, FlowHNDeltaNet, FlowHNRotaryEmbedding


def calibrate_split(
    config: FlowHNConfig,
    seq_len: int,
    device: str | torch.device,
    batch_size: int = 1,
    dtype: torch.dtype | None = None,
    steps: int = 8,
) -> float:
    """Set `config.attention_ratio` to the fraction of tokens at which one layer's attention branch and DeltaNet
    branch take equal time (forward + backward) on `device`, and return it.

    The FLOP cost model behind `attention_ratio="auto"` counts arithmetic; this measures it, kernels' efficiencies
    included. Bisection over the ratio, timing both branches at each step.
    """
    if not isinstance(seq_len, int) or seq_len < 4:
        raise ValueError(f"`seq_len` must be an integer >= 4, got {seq_len!r}")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    attention = FlowHNBranch(config, FlowHNAttention(config, 0)).to(device, dtype)
    deltanet = FlowHNBranch(config, FlowHNDeltaNet(config, 0)).to(device, dtype)
    rotary = FlowHNRotaryEmbedding(config).to(device)

    def attention_step(x):
        positions = torch.arange(x.shape[1], device=device)[None].expand(x.shape[0], -1)
        return attention(x, BranchTokens(None, None), rotary(x, positions))

    def deltanet_step(x):
        return deltanet(x, BranchTokens(None, None), None)

    low, high = 1 / seq_len, 1 - 1 / seq_len
    for _ in range(steps):
        ratio = (low + high) / 2
        tokens = max(1, round(ratio * seq_len))
        slower = _seconds(attention_step, batch_size, tokens, config, device, dtype) > _seconds(
            deltanet_step, batch_size, seq_len - tokens, config, device, dtype
        )
        low, high = (low, ratio) if slower else (ratio, high)
    config.attention_ratio = round((low + high) / 2, 4)
    return config.attention_ratio


def _seconds(step, batch_size, tokens, config, device, dtype, repeats=5) -> float:
    """Median time of a forward + backward of `step` over `tokens` tokens."""
    x = torch.randn(batch_size, tokens, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    times = []
    for _ in range(repeats + 1):  # the first run warms up (compilation, autotuning)
        _synchronize(device)
        start = time.perf_counter()
        step(x).float().square().mean().backward()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
