"""How FlowHN's training compiles a model: what `flowhn-train --compile` runs, and what the throughput benchmark times
with the same scope. Imports nothing, so the benchmark can use it where `datasets` is absent."""

import weakref

SCOPES = ("layers", "model")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that replay CUDA graphs


def compile_in_place(model, scope, accumulates_gradients=True, **compile_kwargs):
    """`torch.compile` each decoder layer (`scope="layers"`, `model.model.layers`) or the whole model with its loss
    (`"model"`), in place; keyword arguments as torch.compile's. In place, so that checkpoints, save and export see
    the plain module; per layer, as FSDP2 shards per layer. The whole model is one graph (FlowHN's kernels are custom
    ops), with no eager code between the layers, the embedding and the loss.

    With `accumulates_gradients`, in a mode that replays CUDA graphs, the compiled parameters' gradients are copied
    out of the graphs' memory pool when they would become `.grad` (`copy_first_gradient`): otherwise `.grad` would
    hold the pool's buffer, which the next micro-batch's replay overwrites, and accumulating gradients fails (PyTorch
    issue 169545). A loop that sets the gradients to None after each backward's optimizer step needs no copy."""
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    compiled = list(model.model.layers) if scope == "layers" else [model]
    for module in compiled:
        module.compile(**compile_kwargs)
    if accumulates_gradients and compile_kwargs.get("mode") in CUDA_GRAPH_MODES:
        for module in compiled:
            for param in module.parameters():
                if param.requires_grad:
                    copy_first_gradient(param)


def copy_first_gradient(param):
    """Copy each gradient of `param` that arrives while `.grad` is None. AccumulateGrad keeps such a gradient tensor
    itself as `.grad`, and adds the later ones of an accumulation into it in place, so only the first needs a copy."""
    ref = weakref.ref(param)
    param.register_hook(lambda grad: grad.clone() if ref().grad is None else grad)
