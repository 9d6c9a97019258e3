"""How FlowHN's training compiles a model: what `flowhn-train --compile` runs, and what the throughput benchmark times
with the same scope. Imports nothing beyond torch, so the benchmark can use it where `datasets` is absent."""

SCOPES = ("layers", "model")


def compile_in_place(model, scope="layers", **compile_kwargs):
    """`torch.compile` each decoder layer (`scope="layers"`, `model.model.layers`) or the whole model with its loss
    (`"model"`), in place; keyword arguments as torch.compile's. In place, so that checkpoints, save and export see
    the plain module; per layer, as FSDP2 shards per layer. The whole model is one graph (FlowHN's kernels are custom
    ops), with no eager code between the layers, the embedding and the loss."""
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    for module in model.model.layers if scope == "layers" else (model,):
        module.compile(**compile_kwargs)
