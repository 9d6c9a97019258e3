"""How FlowHN's training compiles a model: what `flowhn-train --compile` runs, and what the throughput benchmark times
with the same scope. Imports nothing beyond torch, so the benchmark can use it where `datasets` is absent."""

import torch

SCOPES = ("layers", "model")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that replay CUDA graphs


def compile_in_place(model, scope, accumulates_gradients=True, **compile_kwargs):
    """`torch.compile` each decoder layer (`scope="layers"`, `model.model.layers`) or the whole model with its loss
    (`"model"`), in place; keyword arguments as torch.compile's. In place, so that checkpoints, save and export see
    the plain module; per layer, as FSDP2 shards per layer. The whole model is one graph (FlowHN's kernels are custom
    ops), with no eager code between the layers, the embedding and the loss.

    With `accumulates_gradients`, in a mode that replays CUDA graphs, each parameter's gradient is copied out of the
    graph's memory pool as it arrives: otherwise `.grad` would hold the pool's buffer, which the next micro-batch's
    replay overwrites, and accumulating gradients fails (PyTorch issue 169545). A loop that sets the gradients to
    None after each backward's optimizer step needs no copy (it costs ~1.2 ms of FAC's 73 ms step on an H100)."""
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    for module in model.model.layers if scope == "layers" else (model,):
        module.compile(**compile_kwargs)
    if accumulates_gradients and compile_kwargs.get("mode") in CUDA_GRAPH_MODES:
        for param in model.parameters():
            if param.requires_grad:
                param.register_hook(torch.clone)
