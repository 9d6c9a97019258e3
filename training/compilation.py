"""How FlowHN's training compiles a model: what `flowhn-train --compile` runs, and what the throughput benchmark times
as `--compile-scope layers`. Imports nothing beyond torch, so the benchmark can use it where `datasets` is absent."""


def compile_layers(model, **compile_kwargs):
    """`torch.compile` each decoder layer in place (`model.model.layers`; keyword arguments as torch.compile's): per
    layer, as FSDP2 shards per layer, and in place, so that checkpoints, save and export see the plain module."""
    for layer in model.model.layers:
        layer.compile(**compile_kwargs)
