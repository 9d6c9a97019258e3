"""The throughput benchmark's smoke mode (tiny models, CPU) and the pieces it stands on."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import flowhn_hf
from flowhn_hf import modeling_flowhn as mf
from training.benchmarks import throughput as tb
from training.benchmarks.sequential_hybrid import SequentialHybridForCausalLM, count_parameters, sequential_config


@pytest.fixture
def one_thread():
    """Tiny models run fastest, and steadiest on a busy machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_run_writes_table_json_and_plot(tmp_path, monkeypatch, one_thread):
    """The whole script: every model gets a row, none fails, the reports are written, to $OUT too. Each row runs
    its child's code (`main` with --child-json) in this process, which spares CI nine interpreter start-ups; the
    child processes themselves are tested by the crashing-row and --trees tests."""

    def row_in_this_process(name, compiled, argv, args, tree=None):
        result = tmp_path / f"{name}.json"
        tb.main([*argv, "--models", name, "--compile", "on" if compiled else "off", "--child-json", str(result)])
        return json.loads(result.read_text())

    monkeypatch.setattr(tb, "run_row", row_in_this_process)
    out = tmp_path / "out"
    env_out = tmp_path / "env_out"
    monkeypatch.setenv("OUT", str(env_out))
    tb.main(["--smoke", "--out-dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == list(tb.DEFAULT_MODELS)
    for name, row in rows.items():
        assert "error" not in row, (name, row["error"])
        if "skipped" in row:  # fla without flash-linear-attention, calibration without calibrate_split
            assert name in ("fla-deltanet", "flowhn-FAC-calibrated"), (name, row["skipped"])
            continue
        assert row["train_tokens_per_s"] > 0 and math.isfinite(row["final_loss"])
        assert 0 < row["train_flops_per_token"] and 0 < row["mfu"]
        assert row["generate_b1_tokens_per_s"] > 0 and row["generate_b2_tokens_per_s"] > 0
    text = (out / "RESULTS.md").read_text()
    assert "| model |" in text and "FlowHN flop_aware_circulating" in text and "SMOKE" in text
    assert (env_out / "RESULTS.md").read_text() == text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sequential_hybrid_matches_flowhn_size_and_decodes_like_a_forward(one_thread):
    flowhn = flowhn_hf.preset_config("tiny")
    config = sequential_config(flowhn)
    target = flowhn_hf.count_parameters(flowhn)
    step = 2 * 3 * config.hidden_size * 64 * flowhn.num_hidden_layers  # one MLP-width step of 64, both MLPs a pair
    assert abs(count_parameters(config) - target) <= step / 2
    torch.manual_seed(0)
    model = SequentialHybridForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, pad_token_id=0)  # fmt: skip
        logits = model(input_ids=out[:, :-1], use_cache=False).logits
    assert torch.equal(logits[:, 11:].argmax(-1), out[:, 12:])


def test_sequential_hybrid_trains_without_a_cache(one_thread):
    """Like FlowHN's model, the sequential hybrid builds a cache only where a next token is decoded, not in a training
    step: with one, its DeltaNet blocks took the decoding path (the conv in torch, the final states kept), and the
    benchmark timed a slower step than the hybrid needs."""
    config = sequential_config(flowhn_hf.preset_config("tiny"))
    torch.manual_seed(0)
    model = SequentialHybridForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    assert getattr(model(input_ids=ids, labels=ids), mf.CACHE_NAME) is None
    with torch.no_grad():
        assert getattr(model.eval()(input_ids=ids), mf.CACHE_NAME) is not None


def test_flop_formulas():
    """Llama's count is 6·N + 6·L·H·hd·T per token (causal attention); FlowHN's split modes count each token only
    in the branch it is routed to."""
    args = tb.parse_args(["--smoke"])
    state = {"target": tb.target_parameters(args)}
    with torch.device("meta"):
        llama, _ = tb.build_model("llama", args, state)
    c, t = llama.config, args.seq_len
    n = sum(p.numel() for p in llama.parameters())
    head_dim = c.hidden_size // c.num_attention_heads
    embed = c.vocab_size * c.hidden_size  # the lookup counts nothing, the tied LM head 6·d·V
    final_norm = c.hidden_size  # not counted
    expected = 6 * (n - embed - final_norm) + 6 * embed + 6 * c.num_hidden_layers * c.num_attention_heads * head_dim * t
    assert tb.model_flops("llama", llama, t)["train"] / t == pytest.approx(expected)
    with torch.device("meta"):
        none, _ = tb.build_model("flowhn-none", args, state)
        fac, _ = tb.build_model("flowhn-FAC", args, state)
    assert tb.model_flops("flowhn-FAC", fac, t)["dense"] < tb.model_flops("flowhn-none", none, t)["dense"]
    assert tb.attention_core_flops(8, 2, 4) == 2 * 2 * 4 * 64


def test_llama_with_a_bf16_residual_stream_is_the_llama_otherwise():
    """The like-for-like Llama row: under autocast its layers pass bf16 between them (as FlowHN's
    `autocast_residual`), outside it nothing changes; same weights, same FLOP count."""
    args = tb.parse_args(["--smoke"])
    state = {"target": tb.target_parameters(args)}
    torch.manual_seed(0)
    llama, _ = tb.build_model("llama", args, state)
    torch.manual_seed(0)
    bf16, _ = tb.build_model("llama-bf16-residual", args, state)
    ids = torch.randint(0, 1024, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = [h.dtype for h in bf16(ids, output_hidden_states=True).hidden_states[1:-1]]
        plain = [h.dtype for h in llama(ids, output_hidden_states=True).hidden_states[1:-1]]
    assert set(dtypes) == {torch.bfloat16} and set(plain) == {torch.float32}
    torch.testing.assert_close(bf16(ids).logits, llama(ids).logits)
    flops = tb.model_flops("llama", llama, args.seq_len)
    assert tb.model_flops("llama-bf16-residual", bf16, args.seq_len) == flops


def test_a_failing_model_fills_its_row_and_the_run_goes_on(monkeypatch, one_thread):
    args = tb.parse_args(["--smoke", "--precision", "autocast", "--decode-batch-sizes", "1"])
    state = {"target": tb.target_parameters(args)}
    device = torch.device("cpu")
    batch = torch.randint(0, 1024, (args.batch_size, args.seq_len))
    real = tb.train_throughput
    calls = []

    def flaky(model, batch, args, device, precision=None, compiled=False):
        calls.append(precision)
        if precision is None:
            raise RuntimeError("mixed dtypes")
        return real(model, batch, args, device, precision=precision, compiled=compiled)

    monkeypatch.setattr(tb, "train_throughput", flaky)
    row = tb.run_model("llama", args, device, batch, state)
    assert calls == [None, "bf16"] and "autocast failed" in row["note"] and row["train_tokens_per_s"] > 0

    def broken(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tb, "train_throughput", broken)
    row = tb.run_model("llama", args, device, batch, state)
    assert row["error"].startswith("train: OutOfMemoryError") and row["generate_b1_tokens_per_s"] > 0
    assert "| Llama" in tb.markdown_table([row], args)


def test_compile_both_and_a_crashing_row(tmp_path, monkeypatch, one_thread):
    """--compile both: each model twice, the compiled row timed after its compiling warm-up and without decode.
    aot_eager runs the torch.compile path (Dynamo, AOTAutograd) without Inductor's C++ builds, cheaply on a CPU.
    A row whose process dies (here the eager one, by a segmentation fault, as fla's did under torch.compile on an
    H200) says so in its row with the end of its stderr, and the next row runs."""
    crash = "import os, signal, sys; print('in the kernel', file=sys.stderr); os.kill(os.getpid(), signal.SIGSEGV)"
    real = tb.child_command
    monkeypatch.setattr(  # the eager row's argv ends in "--compile", "off"
        tb, "child_command", lambda argv: [sys.executable, "-c", crash] if "off" in argv else real(argv)
    )
    rows = tb.main(["--smoke", "--models", "flowhn-FAC", "--compile", "both", "--compile-backend", "aot_eager",
                    "--decode-batch-sizes", "1", "--out-dir", str(tmp_path)])  # fmt: skip
    assert [(r["model"], r["compiled"]) for r in rows] == [("flowhn-FAC", False), ("flowhn-FAC", True)]
    crashed, compiled = rows
    assert crashed["error"] == "crashed: signal 11 (SIGSEGV); stderr ends: in the kernel"
    assert "error" not in compiled and compiled["train_tokens_per_s"] > 0 and compiled["warmup_s"] > 0
    assert compiled["mfu"] > 0 and "decode_b1_tokens_per_s" not in compiled
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| FlowHN flop_aware_circulating (compiled) |" in text and "crashed: signal 11 (SIGSEGV)" in text


@pytest.mark.parametrize("scope", ["layers", "model"])
def test_compile_scope_compiles_in_place_as_flowhn_train_does(scope, one_thread):
    """--compile-scope times what `flowhn-train --compile --compile-scope` runs (one helper,
    training.compilation.compile_in_place, serves both): each decoder layer, the embedding and the loss eager, or
    the whole model; in place either way, so the model's own modules are what is called."""
    args = tb.parse_args(["--smoke", "--compile-scope", scope, "--compile-backend", "aot_eager", "--steps", "1"])
    state = {"target": tb.target_parameters(args)}
    model, _ = tb.build_model("flowhn-FAC", args, state)
    batch = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len))
    try:
        row = tb.train_throughput(model, batch, args, torch.device("cpu"), compiled=True)
        layers = [layer._compiled_call_impl is not None for layer in model.model.layers]
        assert layers == [scope == "layers"] * len(layers) and math.isfinite(row["final_loss"])
        assert (model._compiled_call_impl is not None) == (scope == "model") and "warning" not in row
        # the row's decoding runs eagerly though the model stays compiled
        assert not traced_while(lambda: tb.decode_throughput(model.eval(), args, torch.device("cpu"), 1), model)
    finally:
        torch._dynamo.reset()
    text = tb.write_reports([{"model": "flowhn-FAC", "compiled": True, **row}], args, tb.environment(
        torch.device("cpu"), {"peak_flops": 1.0, "peak_how": "test"}), [])
    assert f"(as `flowhn-train --compile --compile-scope {scope}`)" in text


def traced_while(run, model) -> bool:
    """Whether `run()` traced the first decoder layer's forward under torch.compile: the layer is inside every
    compiled scope."""
    layer, seen = model.model.layers[0], []
    real = layer.forward

    def forward(*args, **kwargs):
        seen.append(torch.compiler.is_compiling())
        return real(*args, **kwargs)

    layer.forward = forward
    try:
        run()
    finally:
        del layer.forward
    assert seen, "the layer never ran"
    return any(seen)


def test_quality_evaluates_eagerly_after_compiling_in_place(one_thread):
    """quality.py trains through the model compiled in place, then evaluates eagerly: eval batches without labels
    would otherwise compile a graph of their own."""
    from training.benchmarks import quality

    model = flowhn_hf.FlowHNForCausalLM(flowhn_hf.preset_config("tiny", vocab_size=64))
    tb.compile_model(model, backend="aot_eager")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    try:
        assert traced_while(lambda: model(input_ids=ids, labels=ids), model)  # compiled, as training runs it
        assert not traced_while(lambda: quality.evaluate(model, ids, ids, torch.device("cpu"), 2), model)
    finally:
        torch._dynamo.reset()


def test_a_row_whose_loss_does_not_fall_is_flagged(monkeypatch):
    """Every step trains on the same batch, so a step that learns lowers the loss. A step whose gradients never
    reach the weights (as torch 2.11's compiled loss once did, unseen for two weeks of tables) gets a warning."""
    args = tb.parse_args(["--smoke", "--warmup", "2", "--steps", "2"])
    model, batch = torch.nn.Linear(1, 1), torch.zeros(1, 1)
    monkeypatch.setattr(tb, "training_step", lambda *a, **k: lambda: torch.tensor(2.5))
    row = tb.train_throughput(model, batch, args, torch.device("cpu"))
    assert row["first_loss"] == row["final_loss"] == 2.5 and "the loss did not fall" in row["warning"]
    falling = iter([3.0, 2.9, 2.8, 2.7])
    monkeypatch.setattr(tb, "training_step", lambda *a, **k: lambda: torch.tensor(next(falling)))
    assert "warning" not in tb.train_throughput(model, batch, args, torch.device("cpu"))


def test_the_gpu_benchmarks_import_without_datasets():
    """The GPU image has no `datasets` (only pretraining's data pipeline needs it): the throughput and profile scripts
    must import without it."""
    code = ("import sys; sys.modules['datasets'] = None; "
            "import training.benchmarks.throughput, training.benchmarks.profile_step")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_profile_step_groups_the_kernels_of_a_training_step(tmp_path, one_thread):
    from training.benchmarks import profile_step

    profile_step.main(["--smoke", "--models", "flowhn-FAC,flowhn-none", "--top", "5", "--out-dir", str(tmp_path)])
    side_by_side = (tmp_path / "profile_groups.md").read_text().splitlines()
    assert side_by_side[2] == "| group | flowhn-FAC ms | flowhn-none ms | flowhn-none / flowhn-FAC |"
    assert side_by_side[-1].startswith("| all | ")
    text = (tmp_path / "profile_flowhn-FAC.md").read_text()
    assert "ms a step" in text and "| group | launches/step | ms/step | share |" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 5
    # each kernel's launchers, e.g. "SplitTokens (8); top level (8)": the autograd node or op above the ATen call
    assert all(re.search(r"\| [^|]+ \(\d+\)(; [^|]+ \(\d+\))* \|$", row) for row in rows), rows
    # the optimizer's annotated region is not a kernel: its time is its ops' time again (it led this table before)
    assert not any(row.startswith("| `Optimizer.step") for row in rows), rows


def test_profile_comparison_sets_each_model_against_the_first():
    from training.benchmarks.profile_step import comparison

    table = comparison({"a": {"matmul": 2.0, "copy": 1.0}, "b": {"matmul": 3.0, "attention": 0.5}}).splitlines()
    assert table[0] == "| group | a ms | b ms | b / a |"
    assert table[2:] == ["| matmul | 2.00 | 3.00 | 1.50 |", "| copy | 1.00 | 0.00 | 0.00 |",
                         "| attention | 0.00 | 0.50 | – |", "| all | 3.00 | 3.50 | 1.17 |"]  # fmt: skip


def test_trees_run_each_row_from_each_source_tree(tmp_path, one_thread):
    """--trees: each row once from each tree in turn, its child process on that tree's code; a path that is not a
    source tree of the repository is refused before any row runs."""
    copy = tmp_path / "copy"
    for part in ("flowhn_hf", "kernels", "training"):
        shutil.copytree(tb.ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    rows = tb.main(["--smoke", "--models", "flowhn-FAC", "--decode-batch-sizes", "", "--trees",
                    f"here={tb.ROOT},copy={copy}", "--out-dir", str(tmp_path / "out")])  # fmt: skip
    assert [(r["tree"], Path(r["code"])) for r in rows] == [("here", tb.ROOT), ("copy", copy.resolve())]
    assert all("error" not in r and r["train_tokens_per_s"] > 0 for r in rows)
    assert "| FlowHN flop_aware_circulating [copy] |" in (tmp_path / "out" / "RESULTS.md").read_text()
    assert tb.without_trees(["--smoke", "--trees", "a=.", "--steps", "1", "--trees=b=."]) == ["--smoke", "--steps", "1"]
    for bad in (f"x={tmp_path}", f"{copy}", f"a={copy},a={copy}"):
        with pytest.raises(SystemExit):
            tb.parse_args(["--smoke", "--trees", bad])


def test_inductor_config_reaches_the_rows_child_process(tmp_path, monkeypatch, one_thread):
    """--inductor-config: settings parsed as Python literals, refused before any row unless each key is one of
    torch._inductor.config's; the child sets them before its row, and the reports list them."""
    from torch._inductor import config

    args = tb.parse_args(["--smoke", "--inductor-config", "combo_kernels=True, triton.cudagraph_trees=False"])
    assert args.inductor_config == {"combo_kernels": True, "triton.cudagraph_trees": False}
    for bad in ("combo_kernels", "no_such_setting=1", "combo_kernels=yes please"):
        with pytest.raises(SystemExit):
            tb.parse_args(["--smoke", "--inductor-config", bad])
    seen = {}
    monkeypatch.setattr(tb, "run_model", lambda *a, **kw: seen.update(combo=config.combo_kernels) or {})
    args = tb.parse_args(["--smoke", "--models", "flowhn-FAC", "--inductor-config", "combo_kernels=True",
                          "--child-json", str(tmp_path / "row.json")])  # fmt: skip
    # Inductor's own patch, which puts the setting back: pytest 9.2's monkeypatch deletes on undo an attribute that
    # was not in the module's __dict__, and a deleted Inductor setting stays hidden for every later compilation
    with config.patch(combo_kernels=False):
        tb.run_child(args, torch.device("cpu"))
    assert seen == {"combo": True} and config.combo_kernels is False
    tb.main(["--smoke", "--models", "flowhn-FAC", "--decode-batch-sizes", "", "--steps", "1",
             "--inductor-config", "combo_kernels=False", "--out-dir", str(tmp_path / "out")])  # fmt: skip
    assert "combo_kernels=False" in (tmp_path / "out" / "RESULTS.md").read_text()


def test_max_minutes_leaves_out_rows_that_would_not_finish(tmp_path, one_thread):
    rows = tb.main(["--smoke", "--models", "llama,flowhn-FAC", "--max-minutes", "0", "--out-dir", str(tmp_path)])
    assert all(r["skipped"].startswith("not run") for r in rows) and len(rows) == 2
    assert "not run" in (tmp_path / "RESULTS.md").read_text()


def test_quality_smoke_run_writes_its_table(tmp_path):
    from training.benchmarks import quality

    assert quality.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quality.json").read_text())
    assert {(r["task"], r["model"]) for r in rows} == {
        (t, m) for t in ("text", "mqar") for m in ("flowhn-FAC", "flowhn-none", "llama")}
    assert len({r["train_tokens"] for r in rows if r["task"] == "text"}) == 1, "equal tokens for every model"
    assert "| mqar | llama |" in (tmp_path / "QUALITY.md").read_text()
    assert {r["train_tokens"] for r in rows if r["task"] == "mqar"} == {8192}, "32 steps of 8 sequences x 32 tokens"


def test_split_period_option_reaches_the_flowhn_models():
    """--split-period in quality.py and throughput.py: the FlowHN configs take it, a period below 2 is refused before
    any work, and the Llama of quality.py keeps FlowHN FAC's parameter count (the period adds no parameters)."""
    from training.benchmarks import quality

    args = quality.parse_args(["--smoke", "--split-period", "48"])
    assert {quality.flowhn_config(name, args, 512).split_period for name in quality.SPLIT_MODES} == {48}
    default = quality.parse_args(["--smoke"])
    assert quality.flowhn_config("flowhn-FAC", default, 512).split_period != 48
    assert quality.llama_config(args, 512).intermediate_size == quality.llama_config(default, 512).intermediate_size
    args = tb.parse_args(["--smoke", "--split-period", "48"])
    assert {tb.flowhn_config(args, mode).split_period for mode in ("none", "flop_aware_circulating")} == {48}
    for parse in (quality.parse_args, tb.parse_args):
        with pytest.raises(SystemExit):
            parse(["--smoke", "--split-period", "1"])


def test_mqar_answers_are_the_values_of_the_queried_keys():
    """Each key is queried once; its value is the label after it and never an input there (a blank, 0); with
    mqar_len > 4 x pairs the other slots are blanks."""
    from types import SimpleNamespace

    from training.benchmarks.quality import mqar_batch

    for length in (20, 36):
        args = SimpleNamespace(pairs=5, mqar_vocab=20, mqar_len=length)
        ids, labels = mqar_batch(3, args, torch.Generator().manual_seed(0))
        assert ids.shape == labels.shape == (3, length)
        for row, row_labels in zip(ids.tolist(), labels.tolist()):
            pairs = dict(zip(row[0:10:2], row[1:10:2]))
            assert len(pairs) == 5 and all(1 <= k <= 20 < v <= 40 for k, v in pairs.items())
            queried = [at for at in range(10, length, 2) if row[at] != 0]
            assert sorted(row[at] for at in queried) == sorted(pairs)
            for at in range(10, length, 2):
                assert row_labels[at] == -100 and row[at + 1] == 0
                assert row_labels[at + 1] == (pairs[row[at]] if at in queried else -100)
            assert all(label == -100 for label in row_labels[:10])


def test_quality_reads_a_pre_tokenized_corpus_and_stops_at_its_budget(tmp_path):
    """--corpus: train.bin / eval.bin of uint16 ids as build_corpus.py writes them; --max-minutes 0 trains nothing
    but still writes the table."""
    import numpy as np

    from training.benchmarks import quality

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, 300, 64 * 40, dtype=np.uint16).tofile(corpus / "train.bin")
    rng.integers(0, 300, 64 * 3 + 5, dtype=np.uint16).tofile(corpus / "eval.bin")
    (corpus / "meta.json").write_text(json.dumps({"vocab_size": 300, "eos_token_id": 0}))
    args = quality.parse_args(["--smoke", "--corpus", str(corpus)])
    train_blocks, eval_blocks, vocab = quality.text_blocks(args)
    assert train_blocks.shape == (40, 64) and eval_blocks.shape == (3, 64) and vocab == 300
    data = quality.task_data("text", args)  # 32 steps x 4 blocks: 3.2 epochs, each a permutation of the 40 blocks
    index = {tuple(block.tolist()): i for i, block in enumerate(train_blocks)}
    uses = Counter(index[tuple(block.tolist())] for ids, _ in data["train"] for block in ids)
    assert len(uses) == 40 and set(uses.values()) == {3, 4}
    assert quality.main(["--smoke", "--corpus", str(corpus), "--tasks", "text", "--models", "llama",
                         "--out-dir", str(tmp_path / "a")]) == 0  # fmt: skip
    row = json.loads((tmp_path / "a" / "quality.json").read_text())[0]
    assert row["train_tokens"] == 8192 and math.isfinite(row["eval_loss"])
    out = tmp_path / "b"
    assert quality.main(["--smoke", "--corpus", str(corpus), "--max-minutes", "0", "--out-dir", str(out)]) == 0
    assert all("skipped" in r for r in json.loads((out / "quality.json").read_text()))


def test_quality_llama_is_sized_to_flowhn():
    from training.benchmarks import quality

    for size in ("small", "135m"):
        args = quality.parse_args(["--size", size])
        with torch.device("meta"):
            fac = sum(p.numel() for p in quality.build_model("flowhn-FAC", args, 16384).parameters())
            llama = sum(p.numel() for p in quality.build_model("llama", args, 16384).parameters())
        assert abs(llama - fac) / fac < 0.02, (size, llama, fac)


def test_build_corpus_reads_html_as_text_and_expands_alternatives(tmp_path):
    from training.benchmarks.build_corpus import expand, read_document

    page = tmp_path / "page.html"
    page.write_text("<html><head><title>T</title><script>x=1</script></head><body><nav>menu</nav>"
                    "<h1>Title</h1><p>One &amp; two.</p><p>Three</p></body></html>")  # fmt: skip
    assert read_document(page) == "Title\n\nOne & two.\n\nThree"
    assert expand("a/{b,c}/**/*.{rst,txt}") == ["a/b/**/*.rst", "a/b/**/*.txt", "a/c/**/*.rst", "a/c/**/*.txt"]


def test_batch_size_lists_are_refused_by_name_before_any_work(capsys):
    """throughput.py's --decode-batch-sizes and decode_host.py's --batch-sizes: whole numbers ≥ 1, comma-separated;
    anything else stops argparse with the option's name."""
    from training.benchmarks import decode_host

    assert tb.parse_args(["--smoke", "--decode-batch-sizes", "4, 1,"]).decode_batch_sizes == [4, 1]
    assert tb.parse_args(["--smoke", "--decode-batch-sizes", ""]).decode_batch_sizes == []
    assert tb.parse_args(["--smoke"]).decode_batch_sizes == [1, 2]
    for parse, option in ((tb.parse_args, "--decode-batch-sizes"), (decode_host.main, "--batch-sizes")):
        for bad in ("0", "1,x", "-2", "1.5"):
            with pytest.raises(SystemExit):
                parse([option, bad])
            assert option in capsys.readouterr().err


def test_decode_host_prints_every_model_with_its_operation_count(capsys):
    from flowhn_hf import modeling_flowhn
    from training.benchmarks import decode_host

    kernel_call, threads = modeling_flowhn.delta_rule, torch.get_num_threads()
    launch, interpret = decode_host.kernel_ops.recurrent_fwd, os.environ.get("TRITON_INTERPRET")
    decode_host.main(["--batch-sizes", "1", "--rounds", "1"])
    assert modeling_flowhn.delta_rule is kernel_call and torch.get_num_threads() == threads, "left as found"
    assert decode_host.kernel_ops.recurrent_fwd is launch and os.environ.get("TRITON_INTERPRET") == interpret
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| FlowHN") or
            line.startswith("| Llama")]
    assert len(rows) == len(decode_host.MODES) + 1
    ops = {row[0][2:]: int(row[-1].rstrip(" |")) for row in rows}
    assert all(count > 0 for count in ops.values())
    # FlowHN's split modes decode each token through one branch per layer, `none` through both
    assert ops["FlowHN none (15 layers)"] > ops["FlowHN flop_aware_circulating (15 layers)"]


def test_linear_groups_checks_each_grouping_against_the_products_apart(capsys, tmp_path):
    from training.benchmarks import linear_groups

    linear_groups.main(["--smoke", "--out", str(tmp_path / "table.md")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "µs" not in line]
    assert len(rows) == 16
    for row in rows:  # (a timing hiccup on a busy machine may round a ratio to 0.00: read the times it comes from)
        apart, together, ratio = (float(x) for x in row.rstrip(" |").split(" | ")[-3:])
        assert apart > 0 and together > 0 and ratio == pytest.approx(together / apart, rel=0.01, abs=0.01), row
    assert sum("slices" in row for row in rows) == 5  # every slice count that divides the smoke's row counts
    assert (tmp_path / "table.md").read_text().count("\n| ") == 17


def test_linear_groups_check_fails_when_the_grouped_products_differ():
    from training.benchmarks.linear_groups import check

    want = [torch.randn(4, 8)]
    check(want, [want[0] * (1 + 1e-3)])
    with pytest.raises(AssertionError, match="differ"):
        check(want, [want[0].roll(1, dims=0)])


def test_gemm_autotune_counts_every_product_of_a_step_and_times_both_ways(tmp_path):
    """Each Linear's weight takes three products a step (forward and both gradients; the LM head once per chunk of
    its loss, one chunk here), and FAC's branch products split the batch's tokens between them."""
    from flowhn_hf.modeling_flowhn import FlowHNForCausalLM
    from training.benchmarks import gemm_autotune

    model = FlowHNForCausalLM(flowhn_hf.preset_config("tiny", split_mode="flop_aware_circulating"))
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    fac = gemm_autotune.step_products("tiny", "flop_aware_circulating", 2, 64)
    assert sum(fac.values()) == 3 * linears
    forward_rows = {a[0] for a, a_stride, _, b_stride in fac if a_stride[1] == 1 and b_stride[0] == 1}  # x · Wᵀ
    assert any(n + m == 2 * 64 for n in forward_rows for m in forward_rows if max(n, m) < 2 * 64), forward_rows
    gemm_autotune.main(["--smoke", "--out", str(tmp_path / "table.md")])
    text = (tmp_path / "table.md").read_text()
    assert "| product | flowhn-FAC a step | flowhn-none a step | torch.mm µs | max-autotune µs | ratio |" in text
    assert text.count("the step's products take") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_head_weight_gradient_script_runs(capsys):
    from training.benchmarks import head_weight_gradient

    head_weight_gradient.main(["--rows", "64", "--vocab", "256", "--hidden", "32"])
    assert capsys.readouterr().out.count("| ") >= 6
