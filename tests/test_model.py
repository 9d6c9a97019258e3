"""The FlowHN model: routing semantics, causality, padding, cache decoding, gradients, configs, presets."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, rel
from flowhn_hf import FlowHNConfig, FlowHNForCausalLM, count_parameters, preset_config
from flowhn_hf.modeling_flowhn import CACHE_NAME, LinearCrossEntropy, aligned_linear, attention_window, plan_route
from transformers import DynamicCache

MODES = ["none", "alternating", "flop_aware", "flop_aware_circulating"]
TOL = dict(atol=2e-5, rtol=1e-4)


def tiny_model(seed=0, **overrides) -> FlowHNForCausalLM:
    torch.manual_seed(seed)
    fields = dict(split_period=8, max_position_embeddings=256, delta_conv_size=3)
    return FlowHNForCausalLM(preset_config("tiny", **{**fields, **overrides})).eval()


def tokens(batch, length, seed=1, vocab=1024):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
def test_routing_depends_on_position_layer_and_config_only(mode):
    config = preset_config("tiny", split_mode=mode, split_period=8, attention_ratio=0.25)
    positions = torch.arange(64)
    routes = torch.stack([attention_window(layer, config).routes(positions) for layer in range(4)])
    assert torch.equal(routes[:, :8].repeat(1, 8), routes), "periodic in the position"
    if mode == "none":
        assert routes.all()
    elif mode == "alternating":
        assert torch.equal(routes[0, :8], torch.tensor([True] * 4 + [False] * 4))
        assert torch.equal(routes[1], ~routes[0]) and torch.equal(routes[2], routes[0])
    elif mode == "flop_aware":
        assert routes[:, :8].sum(1).tolist() == [2] * 4 and (routes == routes[0]).all()
        assert routes[0, :2].all()
    else:
        assert routes[:, :8].sum(1).tolist() == [2] * 4
        assert routes[:, :8].any(0).all(), "over the layers attention sees every position of a period"


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.51, 0.525, 0.75])
def test_circulating_windows_let_every_token_reach_every_later_one(ratio):
    """Through the layers' branches (a token mixes with the earlier tokens of its own branch), every output depends
    on every earlier input after five layers, also at ratios near 1/2, where windows that only tile the period would
    swap the same two halves in every layer."""
    config = preset_config("tiny", split_mode="flop_aware_circulating", split_period=256, attention_ratio=ratio)
    positions = torch.arange(512)
    earlier = positions[None, :] <= positions[:, None]
    reach = torch.eye(512)
    for layer in range(5):
        route = attention_window(layer, config).routes(positions)
        reach = (((route[:, None] == route[None, :]) & earlier).float() @ reach).clamp(max=1)
    assert torch.equal(reach.bool(), earlier)


@pytest.mark.parametrize("mode", MODES)
def test_attention_count_matches_the_route(mode):
    config = preset_config("tiny", split_mode=mode, split_period=10, attention_ratio=0.37)
    for layer in range(3):
        for start, length in [(0, 1), (0, 97), (3, 8), (17, 33), (1234, 5)]:
            route = attention_window(layer, config).routes(torch.arange(start, start + length))
            assert attention_window(layer, config).count(start, length) == int(route.sum())


@pytest.mark.parametrize("mode", ["alternating", "flop_aware", "flop_aware_circulating"])
def test_closed_form_places_match_a_sort_of_the_routes(mode):
    """AttentionWindow.places equals a stable sort of the routes (the branches' places) and a running count of
    each branch's tokens (merge), at starts before and after the window's offset and at every layer's offset."""
    config = preset_config("tiny", split_mode=mode, split_period=10, attention_ratio=0.37)
    for layer in range(5):
        window = attention_window(layer, config)
        for start, length in [(0, 2), (0, 97), (3, 8), (17, 33), (1234, 5), (7, 10)]:
            routes = window.routes(torch.arange(start, start + length))
            if routes.all() or not routes.any():
                continue
            attention, deltanet, merge = window.places(start, length, torch.device("cpu"))
            order = torch.argsort((~routes).to(torch.int8), stable=True)
            assert torch.equal(torch.cat([attention, deltanet]), order)
            assert torch.equal(merge, torch.argsort(order))


@pytest.mark.parametrize("mode", ["alternating", "flop_aware_circulating"])
def test_split_and_merge_of_a_permuting_route_match_plain_gathers(mode):
    """The one-gather split and merge (each the other's backward) equal autograd's gathers, values and gradients."""
    config = preset_config("tiny", split_mode=mode, split_period=8, attention_ratio=0.3)
    positions = torch.arange(5, 5 + 37).expand(3, -1)
    route = plan_route(attention_window(1, config), positions, None, 5)
    assert route.permutes and route.attention.size not in (0, 37)
    x = torch.randn(3, 37, 6, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(3, n, 6, dtype=torch.float64) for n in (route.attention.size, route.deltanet.size, 37)]

    def loss(split, merge):
        a, d = split(x)
        return sum((w * t).sum() for w, t in zip(weights, (a, d, merge(torch.cat([a.sin(), d.cos()], 1)))))

    plain = (lambda x: (route.attention.gather(x), route.deltanet.gather(x)),
             lambda both: both.gather(1, route.merge_index[..., None].expand(-1, -1, 6)))
    expected, = torch.autograd.grad(loss(*plain), x)
    got, = torch.autograd.grad(loss(route.split, route.merge), x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(route.merge(torch.cat(route.split(x), dim=1)), x)


def test_single_period_reproduces_the_papers_split():
    """With one period spanning the sequence, FA_Split gives attention the first ρT tokens, the rest to DeltaNet."""
    config = preset_config("tiny", split_mode="flop_aware", split_period=100, attention_ratio=0.3)
    route = attention_window(5, config).routes(torch.arange(100))
    assert route[:30].all() and not route[30:].any()


@pytest.mark.parametrize("mode", MODES)
def test_causal(mode):
    model = tiny_model(split_mode=mode)
    x = tokens(2, 40)
    y = x.clone()
    y[:, 23:] = tokens(2, 17, seed=7)
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :23], b[:, :23], **TOL)
    assert not torch.allclose(a[:, 23:], b[:, 23:])


@pytest.mark.parametrize("mode", MODES)
def test_right_padding_changes_nothing(mode):
    model = tiny_model(split_mode=mode)
    x = tokens(2, 30)
    mask = torch.ones_like(x)
    mask[1, 19:] = 0
    with torch.no_grad():
        batched = model(x, attention_mask=mask).logits
        alone = model(x[1:, :19]).logits
    torch.testing.assert_close(batched[1, :19], alone[0], **TOL)
    torch.testing.assert_close(batched[0], model(x[:1]).logits[0], **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_left_padded_batch_matches_each_row_alone(mode):
    model = tiny_model(split_mode=mode)
    long, short = tokens(1, 27, seed=2), tokens(1, 16, seed=3)
    x = torch.cat([long, torch.cat([torch.zeros(1, 11, dtype=torch.long), short], 1)])
    mask = torch.ones_like(x)
    mask[1, :11] = 0
    with torch.no_grad():
        batched = model(x, attention_mask=mask).logits
        torch.testing.assert_close(batched[0], model(long).logits[0], **TOL)
        torch.testing.assert_close(batched[1, 11:], model(short).logits[0], **TOL)
    generated = model.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for row, prompt in ((0, long), (1, short)):
        alone = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(generated[row, -12:], alone[0, -12:])


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_cached_decoding_matches_one_forward(mode, rank):
    model = tiny_model(split_mode=mode, delta_rank=rank, delta_beta_max=2.0)
    x = tokens(2, 37)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :9], cache=cache, use_cache=True).logits]
        steps.append(model(x[:, 9:14], cache=cache, use_cache=True).logits)  # a few tokens at once
        for t in range(14, 37):
            steps.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


@pytest.mark.parametrize("triton_env", ["cpu"], indirect=True)
def test_cached_decoding_through_the_kernels_matches_one_forward(triton_env):
    """The same in Triton's interpreter, where the kernels run: the whole sequence's DeltaNet calls take the chunked
    kernels (more than RECURRENT_MAX_LEN tokens a branch), each decoding step's the recurrent kernel, which
    L2-normalises q and k itself."""
    model = tiny_model(split_mode="flop_aware_circulating", delta_rank=2)
    with torch.no_grad():  # keys far from unit length, and a DeltaNet branch that moves the logits
        for layer in model.model.layers:
            layer.deltanet_branch.mixer.qkv_proj.weight.mul_(20)
            layer.deltanet_branch.mixer.o_proj.weight.mul_(20)
    x = tokens(2, 48)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :36], cache=cache, use_cache=True).logits]
        for t in range(36, 48):
            steps.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_left_padded_cached_decoding_matches_one_forward(mode):
    model = tiny_model(split_mode=mode)
    x = tokens(3, 30)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    mask[2, :13] = 0
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :17], attention_mask=mask[:, :17], cache=cache, use_cache=True).logits]
        for t in range(17, 30):
            step = model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()], **TOL)


def test_the_cache_is_taken_by_either_name():
    """transformers 5.25 renamed `past_key_values` to `cache`, and each version's generate passes its own name."""
    model = tiny_model()
    x = tokens(2, 12)
    with torch.no_grad():
        by_name = {}
        for name in ("cache", "past_key_values"):
            cache = DynamicCache(config=model.config)
            first = model(x[:, :7], **{name: cache}).logits
            output = model(x[:, 7:], **{name: cache})
            assert getattr(output, CACHE_NAME) is cache
            by_name[name] = torch.cat([first, output.logits], 1)
        torch.testing.assert_close(by_name["cache"], by_name["past_key_values"], rtol=0, atol=0)
        torch.testing.assert_close(by_name["cache"], model(x).logits, **TOL)
        with pytest.raises(ValueError, match="past_key_values"):
            model(x, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_greedy_generate_matches_argmax_of_forward():
    model = tiny_model()
    prompt = tokens(1, 10)
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        logits = model(generated).logits
    assert torch.equal(logits[0, 9:-1].argmax(-1), generated[0, 10:])


def test_sampling_and_beam_search():
    model = tiny_model()
    prompt = tokens(2, 6)
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=50, num_return_sequences=2)
    assert sampled.shape == (4, 11)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(prompt, max_new_tokens=5, num_beams=2)
    # a static cache would hand the model a dict of masks and no DeltaNet state; refused by name
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(prompt, max_new_tokens=5, cache_implementation="static")
    assert model.generate(prompt, max_new_tokens=5, cache_implementation="dynamic").shape == (2, 11)


@pytest.mark.parametrize("fusion", ["linear", "normalized_mean"])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_every_parameter(mode, fusion):
    model = tiny_model(split_mode=mode, fusion=fusion, delta_rank=2).train()
    x = tokens(2, 40)
    model(x, labels=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_bf16_autocast_and_bf16_weights_on_the_cpu():
    """Mixed precision on the CPU (accelerate's bf16, lm-eval's dtype=bfloat16) trains and decodes: the DeltaNet
    reference keeps its own float32 arithmetic under autocast (its triangular solve has no bf16 CPU kernel)."""
    model = tiny_model(delta_rank=2).train()
    x = tokens(2, 70)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    reference = tiny_model(delta_rank=2).train()(x, labels=x).loss
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) < 0.05
    model = model.to(torch.bfloat16).eval()
    assert model.generate(x[:, :9], max_new_tokens=4, do_sample=False).shape == (2, 13)


@pytest.mark.parametrize("autocast_residual, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_residual_stream_dtype_under_autocast(autocast_residual, dtype):
    """`autocast_residual` carries every layer's output in autocast's dtype, else in the parameters' float32; the
    loss and the gradients' dtype don't depend on it beyond bf16's rounding."""
    model = tiny_model(autocast_residual=autocast_residual).train()
    x = tokens(2, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x, output_hidden_states=True)
    assert [h.dtype for h in out.hidden_states[:-1]] == [dtype] * model.config.num_hidden_layers
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    reference = tiny_model().train()(x, labels=x).loss
    assert abs(out.loss.item() - reference.item()) < 0.05
    outside = model(x, output_hidden_states=True).hidden_states  # outside autocast: the parameters' dtype either way
    assert {h.dtype for h in outside} == {torch.float32}


def test_hidden_states_and_tuples_as_transformers_returns_them():
    """`output_hidden_states`: the embeddings, then each layer's output, the last after the final norm (so the
    logits are the LM head of the last one); `return_dict=False`: a tuple, as every transformers model returns."""
    model = tiny_model()
    x = tokens(2, 20)
    out = model(x, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], model.get_input_embeddings()(x))
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits, **TOL)
    assert model(x).hidden_states is None
    loss, logits, _ = model(x, labels=x, return_dict=False)
    torch.testing.assert_close(logits, out.logits, **TOL)
    assert isinstance(model.model(x, return_dict=False), tuple)
    steps = model.generate(x[:, :5], max_new_tokens=3, do_sample=False, output_hidden_states=True,
                           return_dict_in_generate=True)
    assert len(steps.hidden_states) == 3 and len(steps.hidden_states[0]) == model.config.num_hidden_layers + 1
    # attention sees only its routed tokens: no (T x T) maps, said before any work (transformers' sdpa models
    # return an empty tuple instead)
    with pytest.raises(ValueError, match="output_attentions"):
        model(x, output_attentions=True)
    assert model(x, output_attentions=False).logits.shape == out.logits.shape


def test_loss_counts_items_like_transformers():
    model = tiny_model()
    x = tokens(2, 20)
    labels = x.clone()
    labels[0, :5] = -100
    summed = model(x, labels=labels, num_items_in_batch=torch.tensor(10)).loss
    mean = model(x, labels=labels).loss
    torch.testing.assert_close(summed * 10, mean * (labels[:, 1:] != -100).sum(), rtol=1e-5, atol=1e-5)


def test_logits_to_keep_and_gradient_checkpointing():
    model = tiny_model().train()
    x = tokens(2, 20)
    assert model(x, logits_to_keep=1).logits.shape == (2, 1, 1024)
    reference = model(x, labels=x).loss
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()  # newer name, or older
    loss = model(x, labels=x).loss
    loss.backward()
    torch.testing.assert_close(loss, reference)
    assert all(p.grad is not None for p in model.parameters())


def test_aligned_linear_is_the_linear_with_its_gradients(monkeypatch):
    """β's product widened to 16 features and cut back gives the 9-feature product and the same gradients; a linear
    that is not a plain nn.Linear (an adapter, a quantised layer), or a few rows (a decoding step), take the linear
    itself."""
    pads = []
    pad = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: pads.append(1) or pad(*a, **k))
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 9, bias=False)
    aligned_linear(linear, torch.randn(3, 1, 24))
    assert not pads
    x = torch.randn(3, 50, 24, requires_grad=True)
    got = aligned_linear(linear, x)
    gw_got, gx_got = torch.autograd.grad((got * torch.arange(9.0)).sum(), (linear.weight, x))
    assert len(pads) == 1
    want = linear(x)
    gw, gx = torch.autograd.grad((want * torch.arange(9.0)).sum(), (linear.weight, x))
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(gw_got, gw, atol=1e-5) and torch.allclose(gx_got, gx, atol=1e-5)

    class Wrapped(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1

    wrapped = Wrapped(24, 9, bias=False)
    assert torch.equal(aligned_linear(wrapped, x), wrapped(x))
    biased = torch.nn.Linear(24, 9)
    assert torch.allclose(aligned_linear(biased, x), biased(x), atol=1e-6)


def test_eager_attention_matches_sdpa():
    model = tiny_model(split_mode="flop_aware_circulating")
    x = tokens(2, 33)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    with torch.no_grad():
        sdpa = model(x, attention_mask=mask).logits
        model.config._attn_implementation = "eager"
        eager = model(x, attention_mask=mask).logits
        unpadded = model(x).logits
        model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(eager, sdpa, **TOL)
    torch.testing.assert_close(unpadded, model(x).logits, **TOL)


@pytest.mark.parametrize(
    "field, value",
    [
        ("split_mode", "halves"),
        ("split_period", 1),
        ("attention_ratio", 1.0),
        ("attention_ratio", "half"),
        ("delta_rank", 5),
        ("delta_head_dim", 512),
        ("delta_beta_max", 2.5),
        ("delta_conv_size", 1),
        ("fusion", "sum"),
        ("autocast_residual", "yes"),
        ("num_key_value_heads", 3),
        ("hidden_size", 0),
        ("layer_types", ["full_attention", "hybrid"]),
    ],
)
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        preset_config("tiny", **{field: value})


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        preset_config("7b")


@pytest.mark.parametrize("name, target", [("135m", 135e6), ("350m", 350e6), ("1b", 1.0e9)])
@pytest.mark.parametrize("mode", ["none", "flop_aware_circulating"])
def test_preset_sizes(name, target, mode):
    config = preset_config(name, split_mode=mode)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert abs(count_parameters(config) / target - 1) < 0.03


def test_auto_ratio_balances_the_cost_model():
    config = preset_config("135m", split_mode="flop_aware")
    rho, seq_len = config.resolved_attention_ratio, config.max_position_embeddings
    attention = rho * seq_len * config.attention_flops_per_token(rho * seq_len / 2)
    deltanet = (1 - rho) * seq_len * config.deltanet_flops_per_token()
    assert 0 < rho < 1 and abs(attention / deltanet - 1) < 1e-6


def test_config_round_trip():
    config = preset_config("tiny", split_mode="alternating", delta_rank=3)
    again = FlowHNConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_flowhn.FlowHNForCausalLM"


@pytest.mark.parametrize("num_items", [None, 37])
def test_training_loss_without_logits_matches_transformers_loss(num_items):
    model = tiny_model().train()
    x = tokens(3, 29)
    labels = x.clone()
    labels[1, :7] = -100
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    fused = model(x, labels=labels, **kwargs)
    assert fused.logits is None
    fused.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x).logits
    reference = model.loss_function(logits=logits, labels=labels, vocab_size=1024, **kwargs)
    reference.backward()
    torch.testing.assert_close(fused.loss, reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_matches_float64(device, compiled, dtype):
    """The training loss's chunks (77 rows in chunks of 16, some labels ignored), eager and compiled: the summed loss
    and both gradients against float64, in float32 and bf16."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(77, 24, generator=g), torch.randn(50, 24, generator=g) / 3
    labels = torch.randint(0, 50, (77,), generator=g)
    labels[::7] = -100
    h, w = (t.to(device, dtype, copy=True).requires_grad_() for t in (hidden, weight))
    loss_fn = partial(LinearCrossEntropy.apply, labels=labels.to(device), chunk_size=16)
    if compiled:
        loss_fn = torch.compile(loss_fn, backend="inductor" if device == "cuda" else "aot_eager", fullgraph=True)
    loss = loss_fn(h, w)
    loss.backward()
    h64, w64 = (t.double().requires_grad_() for t in (hidden, weight))
    reference = F.cross_entropy(h64 @ w64.T, labels, ignore_index=-100, reduction="sum")
    reference.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert h.grad.dtype == w.grad.dtype == dtype
    assert rel(loss.detach().cpu(), reference.detach()) < tol
    assert rel(h.grad.cpu(), h64.grad) < tol and rel(w.grad.cpu(), w64.grad) < tol


@pytest.mark.parametrize("mode", MODES)
def test_packed_documents_match_each_document_alone(mode):
    """position_ids that restart inside a row mark packed documents: nothing crosses from one to the next."""
    model = tiny_model(split_mode=mode, delta_rank=2)
    docs = [tokens(1, n, seed=n) for n in (23, 19, 11, 30, 23)]
    rows = [torch.cat(docs[:3], 1), torch.cat(docs[3:], 1)]
    x = torch.cat(rows)
    position_ids = torch.stack(
        [torch.cat([torch.arange(d.shape[1]) for d in group]) for group in (docs[:3], docs[3:])]
    )
    with torch.no_grad():
        packed = model(x, position_ids=position_ids).logits
        alone = torch.cat([torch.cat([model(d).logits for d in group], 1) for group in (docs[:3], docs[3:])])
    torch.testing.assert_close(packed, alone, **TOL)
    model.train()
    loss = model(x, position_ids=position_ids, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_packed_documents_refuse_a_cache():
    model = tiny_model()
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    with pytest.raises(ValueError, match="packed"):
        model(tokens(1, 5), position_ids=position_ids, cache=DynamicCache(config=model.config))
    assert getattr(model(tokens(1, 5), position_ids=position_ids), CACHE_NAME) is None


def test_causal_conv_matches_a_depthwise_conv1d():
    """The shifted-product convolution equals F.conv1d with left padding, and with packed documents equals each
    document convolved alone."""
    from flowhn_kernels import causal_conv

    torch.manual_seed(0)
    x, weight = torch.randn(2, 29, 6), torch.randn(6, 1, 4)
    want = torch.nn.functional.conv1d(x.transpose(1, 2), weight, padding=3, groups=6)[..., :29].transpose(1, 2)
    got = causal_conv(torch.nn.functional.pad(x, (0, 0, 3, 0)), weight)
    torch.testing.assert_close(got, want)
    documents = torch.tensor([[0] * 10 + [1] * 19, [0] * 29])
    packed = causal_conv(torch.nn.functional.pad(x, (0, 0, 3, 0)), weight, documents)
    second = causal_conv(torch.nn.functional.pad(x[:1, 10:], (0, 0, 3, 0)), weight)
    torch.testing.assert_close(packed[:1, 10:], second)
    torch.testing.assert_close(packed[1:], want[1:])


def test_training_step_compiles_into_one_graph(monkeypatch):
    """torch.compile(fullgraph=True) of a training forward: no graph break anywhere, the DeltaNet kernels included
    (custom ops, run here in Triton's interpreter); loss and gradients as eager."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_model(split_mode="flop_aware_circulating").train()  # routed: gathers and merges in the graph too
    ids = tokens(2, 70)
    model(input_ids=ids, labels=ids).loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    try:
        loss = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        torch._dynamo.reset()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager[name], rtol=1e-4, atol=1e-6, msg=name)
