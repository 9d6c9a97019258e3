"""The model on a GPU, where the DeltaNet branch runs the Triton kernels. Skipped without CUDA."""

import pytest
import torch

from flowhn_hf import FlowHNForCausalLM, preset_config
from transformers import DynamicCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODES = ["none", "alternating", "flop_aware", "flop_aware_circulating"]


def small_model(**overrides):
    torch.manual_seed(0)
    fields = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        delta_num_heads=2, delta_head_dim=64, split_period=16, max_position_embeddings=1024,
    )  # fmt: skip
    return FlowHNForCausalLM(preset_config("tiny", **{**fields, **overrides})).eval()


@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode):
    model = small_model(split_mode=mode, delta_rank=2)
    x = torch.randint(0, 1024, (2, 300))
    with torch.no_grad():
        expected = model(x).logits
        got = model.cuda()(x.cuda()).logits.cpu()
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("mode", MODES)
def test_cuda_cached_decoding_matches_one_forward(mode):
    model = small_model(split_mode=mode).cuda()
    x = torch.randint(0, 1024, (3, 150), device="cuda")
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :130], attention_mask=mask[:, :130], cache=cache, use_cache=True).logits]
        for t in range(130, 150):
            step = model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()], atol=5e-3, rtol=5e-3)


def test_cuda_bf16_training_step_matches_float32():
    model = small_model().cuda().train()
    x = torch.randint(0, 1024, (4, 512), device="cuda")
    reference = model(x, labels=x).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() / reference.item() - 1) < 1e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_cuda_generate_left_padded_batch():
    model = small_model().cuda()
    long, short = torch.randint(0, 1024, (1, 40)).cuda(), torch.randint(0, 1024, (1, 25)).cuda()
    x = torch.cat([long, torch.cat([torch.zeros(1, 15, dtype=torch.long, device="cuda"), short], 1)])
    mask = torch.ones_like(x)
    mask[1, :15] = 0
    batched = model.generate(x, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for row, prompt in ((0, long), (1, short)):
        alone = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[row, -10:], alone[0, -10:])


def test_compiled_rmsnorm_leaves_the_norm_to_inductor():
    """Under torch.compile FlowHNRMSNorm is plain arithmetic, for Inductor to fuse with its neighbours. Through
    F.rms_norm it would reach Inductor as aten._fused_rms_norm on CUDA, which Inductor calls as a kernel of its own
    (the 91 ATen reductions of the compiled FAC step's profile, training/benchmarks/NOTES.md sessions 10 and 17)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from flowhn_hf.modeling_flowhn import FlowHNRMSNorm

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    norm = FlowHNRMSNorm(64).cuda()
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    try:
        y = torch.compile(norm, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)(x)
        y.float().sum().backward()
    finally:
        torch._dynamo.reset()
    ops = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert len(graphs) == 2 and not any("fused_rms_norm" in op for op in ops), ops
    torch.testing.assert_close(y, norm(x), atol=1e-2, rtol=1e-2)  # the eager F.rms_norm path


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("scope", ["model", "layers"])
def test_cuda_compiled_training_step_matches_eager(scope, mode):
    """`flowhn-train --compile --compile-scope SCOPE --compile-mode MODE` (and, whole, users' torch.compile or
    Trainer's torch_compile): two micro-batches' gradients accumulated, with an evaluation forward between them, as
    flowhn-train marks each forward's step for CUDA graphs; the losses and every gradient as eager. On torch 2.11 the
    whole model's loss once trained on zero gradients: its autograd function wrote its gradients in place, and the
    compiled graph lost the writes."""
    from training.compilation import compile_in_place

    model = small_model(split_mode="flop_aware_circulating").cuda().train()
    batches = torch.randint(0, 1024, (2, 2, 300), device="cuda")

    def accumulate():
        losses = []
        for i, x in enumerate(batches):
            torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, labels=x).loss
            loss.backward()
            losses.append(loss.detach().float().clone())
            if i == 0:
                model.eval()
                torch.compiler.cudagraph_mark_step_begin()
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    model(x, labels=x)
                model.train()
        return torch.stack(losses)

    reference = accumulate()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    try:
        compile_in_place(model, scope, mode=mode)
        losses = accumulate()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(losses, reference, atol=2e-3, rtol=2e-3)
    for name, param in model.named_parameters():  # whole tensors: zeros would pass an element-wise atol
        error = (param.grad - eager[name]).norm() / eager[name].norm()
        assert error < 0.05, f"{name}: gradient off by {error:.3f} of its norm"
