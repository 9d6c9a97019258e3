"""flowhn-train on CPU: an end-to-end tiny run, exact resume, DDP and FSDP2 on two processes, --compile, atomic saves,
signals, bad input, the Trainer example."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training import pretrain
from training.checkpoint import list_checkpoints, read_state
from training.data import model_inputs

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--seq-len", "64", "--micro-batch-size", "4", "--eval-blocks", "4", "--sample-tokens", "0",
         "--report-to", "none", "--vocab-size", "512"]


def train_cli(*args, cwd=None, env=None, check=True, **kwargs):
    """Run the flowhn-train console script."""
    cmd = [str(Path(sys.executable).with_name("flowhn-train")), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env, check=False, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"flowhn-train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(run_dir) -> dict[int, float]:
    """Train loss of each step in metrics.jsonl (the last record of a step wins)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows}


def test_evaluation_builds_no_autograd_graph():
    """The eval loss is summed over batches: with autograd on, the sum would hold every batch's activations."""
    from types import SimpleNamespace

    weight = torch.nn.Parameter(torch.ones(()))
    seen = []

    class Model(torch.nn.Module):
        def forward(self, input_ids, labels):
            seen.append(torch.is_grad_enabled())
            return SimpleNamespace(loss=weight * input_ids.float().mean())

    accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"),
                                  reduce=lambda tensor, op: tensor)
    source = SimpleNamespace(eval=torch.arange(24).reshape(6, 4))
    loss = pretrain.evaluate(Model(), source, accelerator, batch_size=4, eos_token_id=None)
    assert seen == [False, False] and loss == pytest.approx(torch.arange(24.0).mean().item())


def test_tiny_run_learns_and_samples(tmp_path):
    """The README command, shortened to 100 steps: beats the unigram entropy and prints a sample."""
    proc = train_cli("--preset", "tiny", "--output-dir", tmp_path / "run", "--max-steps", 100)
    out = proc.stdout
    entropy = float(re.search(r"unigram entropy of the training tokens: ([\d.]+)", out).group(1))
    eval_loss = float(re.search(r"done: .* eval loss ([\d.]+)", out).group(1))
    assert eval_loss < entropy - 0.4, out
    assert "sample:\nTo be, or not to be" in out
    assert "Removed shared tensor" not in out + proc.stderr  # accelerate's note on the tied head, silenced
    (final,) = list_checkpoints(tmp_path / "run")[-1:]
    state = read_state(final)
    assert state["step"] == 100 and state["tokens_seen"] == 100 * 16 * 128
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"} <= {
        p.name for p in final.iterdir()}
    hub = tmp_path / "run" / "hub"
    assert f"Hub-ready checkpoint: {hub}" in out
    assert {"model.safetensors", "config.json", "modeling_flowhn.py", "delta_rule.py", "tokenizer.json",
            "generation_config.json", "README.md"} <= {p.name for p in hub.iterdir()}
    assert "auto_map" in json.loads((hub / "config.json").read_text())
    card = (hub / "README.md").read_text()
    assert "# run\n" in card and 'from_pretrained("run", trust_remote_code=True)' in card  # the run's name
    assert "hub.tmp" not in card  # not the folder the export was written into before its rename


def test_resume_continues_exactly(tmp_path):
    """Resuming from the step-3 checkpoint gives the same losses for steps 4..6 as the uninterrupted run."""
    full = tmp_path / "full"
    train_cli(*SHORT, "--output-dir", full, "--max-steps", 6, "--save-every", 3, "--eval-every", 2)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    (resumed / "metrics.jsonl").unlink()
    proc = train_cli(*SHORT, "--output-dir", resumed, "--max-steps", 6, "--save-every", 3, "--eval-every", 2,
                     "--resume")
    assert "resuming from" in proc.stdout and "(step 3)" in proc.stdout
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
    assert read_state(resumed / "checkpoints" / "step_00000006")["eval_loss"] == read_state(
        full / "checkpoints" / "step_00000006")["eval_loss"]


def test_resume_keeps_the_runs_own_config(tmp_path):
    """A resumed run builds its model from its checkpoint's config.json, not from the preset as the package defines
    it now: defaults that change between releases (split_period's did in session 18) do not change a run under way."""
    run = tmp_path / "run"
    train_cli(*SHORT, "--output-dir", run, "--max-steps", 1, "--save-every", 1, "--eval-every", 1)
    saved = run / "checkpoints" / "step_00000001" / "config.json"
    config = json.loads(saved.read_text())
    assert config["split_period"] == 32  # the tiny preset's
    saved.write_text(json.dumps({**config, "split_period": 16}))  # as a release with another default saved it
    train_cli(*SHORT, "--output-dir", run, "--max-steps", 2, "--save-every", 1, "--eval-every", 1, "--resume")
    assert json.loads((run / "checkpoints" / "step_00000002" / "config.json").read_text())["split_period"] == 16


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    """--override vocab_size below the tokenizer's size would leave token ids without embeddings: refused by name."""
    proc = train_cli(*SHORT, "--output-dir", tmp_path / "run", "--max-steps", 1, "--override", "vocab_size=64",
                     check=False)
    assert proc.returncode != 0
    assert "--override vocab_size=64 is smaller than the tokenizer's" in proc.stderr


def test_streamed_jsonl_with_a_given_tokenizer_resumes_exactly(tmp_path):
    """Local jsonl, streamed, a tokenizer from a path and --max-tokens; resume skips the stream forward."""
    from training.corpus import builtin_corpus_files, train_bpe_tokenizer

    text = Path(builtin_corpus_files()[0]).read_text()
    docs = [text[i:i + 3000] for i in range(0, 120_000, 3000)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_bpe_tokenizer(docs, 400).save_pretrained(tmp_path / "tok")
    args = [*SHORT, "--dataset", tmp_path / "docs.jsonl", "--streaming", "--tokenizer", tmp_path / "tok",
            "--max-tokens", 4 * 4 * 64, "--save-every", 2, "--eval-every", 2]
    full = tmp_path / "full"
    proc = train_cli(*args, "--output-dir", full)
    assert "vocab 400" in proc.stdout and "4 steps" in proc.stdout
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "metrics.jsonl").unlink()
    train_cli(*args, "--output-dir", resumed, "--resume")
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == [3, 4] and [got[3], got[4]] == [expected[3], expected[4]]


def test_one_process_ddp_and_fsdp2_agree_on_cpu(tmp_path):
    """The multi-GPU check on 2 CPU processes in fp32: one process accumulating 2 micro-batches, DDP and FSDP2
    (through training.fsdp_on_cpu) give the same losses, and the sharded FSDP2 checkpoint exports and loads."""
    from training import multi_gpu_check

    out = tmp_path / "report.md"
    assert multi_gpu_check.main(["--cpu", "--steps", "3", "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = out.read_text()
    assert "| 3 |" in report and "**FAIL**" not in report and report.rstrip().endswith("**PASS**")
    assert "PASS: FSDP2 checkpoint is sharded" in report
    assert "2 process(es) on cpu, 8 x 64 tokens per step" in (tmp_path / "work" / "fsdp2.log").read_text()


def test_launches_accelerate_cannot_honour_are_refused(tmp_path):
    """Several processes without ACCELERATE_USE_CPU on a CPU machine, and FSDP on CPU: Accelerate would quietly
    train each process alone, or with plain data parallel; flowhn-train stops instead."""
    args = [*SHORT, "--max-steps", 1]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                           "-m", "training.pretrain", *map(str, args), "--output-dir", str(tmp_path / "two")],
                          cwd=REPO, env=env, check=False, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "launched as 2 processes (WORLD_SIZE) but Accelerate set up 1" in proc.stderr
    proc = train_cli(*args, "--output-dir", tmp_path / "fsdp", env={"ACCELERATE_USE_FSDP": "true"}, check=False)
    assert proc.returncode == 2
    assert "the launch config asks for FSDP but Accelerate set up NO: it enables FSDP only on GPUs" in proc.stderr


COMPILE_WITHOUT_INDUCTOR = """
import sys
import torch
from training import pretrain

compiled, module_compile = [], torch.nn.Module.compile
def compile(self, **kwargs):  # dynamo with the eager backend: the same wrapping, without inductor's minute on CPU
    compiled.append((type(self).__name__, kwargs.get("mode")))
    module_compile(self, backend="eager")
torch.nn.Module.compile = compile
code = pretrain.main(sys.argv[2:])
assert compiled == eval(sys.argv[1]), compiled
sys.exit(code)
"""


@pytest.mark.parametrize(("flags", "compiled"), [
    ([], [("FlowHNForCausalLM", None)]),
    (["--compile-scope", "layers", "--compile-mode", "reduce-overhead"],
     [("FlowHNDecoderLayer", "reduce-overhead")] * 2),
])
def test_compile_trains_and_saves_plain_keys(tmp_path, flags, compiled):
    """--compile compiles the whole model, or with --compile-scope layers each decoder layer, in place: the
    checkpoint and the export hold the module's own keys (no `_orig_mod.`), and the export loads. Dynamo runs with
    its eager backend here (the mode reaches torch.compile unused); inductor takes a minute on CPU."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", COMPILE_WITHOUT_INDUCTOR, repr(compiled), *SHORT, "--output-dir",
                           str(run), "--max-steps", "2", "--grad-accum", "2", "--sample-tokens", "4", "--compile",
                           *flags], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sample:\nTo be, or not to be" in proc.stdout
    keys = load_file(list_checkpoints(run)[-1] / "model.safetensors").keys()
    assert "model.layers.0.fusion.fusion_proj.weight" in keys and not any("_orig_mod" in k for k in keys)
    model = AutoModelForCausalLM.from_pretrained(run / "hub")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


CRASHING_SAVE = """
import sys
from accelerate import Accelerator
from training import pretrain

calls = []
real_save_state = Accelerator.save_state
def save_state(self, output_dir, **kwargs):
    calls.append(output_dir)
    if len(calls) == 2:  # the second save dies half-way: one file written, then the process is gone
        open(output_dir + "/model.safetensors", "wb").write(b"partial")
        raise SystemExit(9)
    return real_save_state(self, output_dir, **kwargs)
Accelerator.save_state = save_state
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_crash_during_save_leaves_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = [*SHORT, "--output-dir", str(run), "--max-steps", "4", "--save-every", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CRASHING_SAVE, *args], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_00000004", "step_00000002"]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    proc = train_cli(*args, "--resume")
    assert "(step 2)" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]


NAN_FROM_STEP_3 = """
import sys
import flowhn_hf
from training import pretrain

forward = flowhn_hf.FlowHNForCausalLM.forward
calls = []
def nan_forward(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    calls.extend([1] if self.training else [])
    if len(calls) >= 3:
        out.loss = out.loss * float("nan")
    return out
flowhn_hf.FlowHNForCausalLM.forward = nan_forward
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_non_finite_loss_stops_without_saving(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", NAN_FROM_STEP_3, *SHORT, "--output-dir", str(run), "--max-steps",
                           "6", "--save-every", "2"], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "flowhn-train: error: the train loss is nan at step 3; stopped without saving" in proc.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("flowhn-train")), *SHORT, "--output-dir", str(run),
           "--max-steps", "100000", "--save-every", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    (checkpoint,) = list_checkpoints(run)
    step = read_state(checkpoint)["step"]
    assert step >= 2 and checkpoint.name == f"step_{step:08d}"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)


def run_main(argv, capsys) -> tuple[int, str]:
    """pretrain.main in this process: argument errors exit 2 through argparse, data errors return 2."""
    try:
        code = pretrain.main([*SHORT, "--max-steps", "1", *argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "2b"], "--preset: unknown preset '2b'; choose one of tiny, 135m, 350m, 1b"),
        (["--seq-len", "4096"], "--seq-len 4096 exceeds max_position_embeddings=512"),
        (["--override", "split_mode=diagonal"], "split_mode"),
        (["--override", "hidden_size"], "expected KEY=VALUE"),
        (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
        pytest.param(["--report-to", "wandb"], "--report-to wandb: the wandb package is not installed",
                     marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")),
        (["--dataset", "no-such-user/no-such-dataset"], "--dataset 'no-such-user/no-such-dataset' is neither"),
        (["--compile-mode", "reduce-overhead"], "--compile-mode applies only with --compile"),
        (["--compile-scope", "model"], "--compile-scope applies only with --compile"),
        (["--compile", "--compile-scope", "whole"], "--compile-scope: invalid choice: 'whole'"),
    ],
)
def test_bad_arguments(offline, capsys, argv, message):
    code, err = run_main(argv, capsys)
    assert code == 2 and message in err, err


def test_whole_model_compile_is_refused_under_fsdp(offline, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    code, err = run_main(["--compile", "--compile-scope", "model"], capsys)
    assert code == 2 and "--compile-scope model: FSDP shards the model per decoder layer" in err, err


@pytest.mark.parametrize(("fsdp", "scope"), [("false", "model"), ("true", "layers")])
def test_compile_scope_defaults_to_the_whole_model_unless_fsdp(monkeypatch, fsdp, scope):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", fsdp)
    assert pretrain.parse_args(["--compile"]).compile_scope == scope


@pytest.mark.parametrize(("mode", "accumulates", "scope", "hooked"), [
    ("reduce-overhead", True, "model", "all"), ("max-autotune", True, "model", "all"),
    ("reduce-overhead", True, "layers", "layers"), ("reduce-overhead", False, "model", "none"),
    (None, True, "model", "none"),
])
def test_cuda_graph_modes_copy_accumulated_gradients_out_of_the_pool(mode, accumulates, scope, hooked):
    """Under CUDA graphs an accumulated `.grad` would be the graph pool's buffer, which the next micro-batch's
    replay overwrites (PyTorch issue 169545): the compiled parameters' gradients are copied by a hook; per layer the
    embedding's and the final norm's come from eager code. The GPU test `tests/test_model_gpu.py -k
    compiled_training_step` accumulates two graphed micro-batches against eager."""
    from flowhn_hf import FlowHNForCausalLM, preset_config
    from training.compilation import compile_in_place

    model = FlowHNForCausalLM(preset_config("tiny", vocab_size=64, num_hidden_layers=1))
    compile_in_place(model, scope, accumulates, mode=mode)
    layers = {id(p) for p in model.model.layers.parameters()}
    expected = {"all": lambda p: True, "layers": lambda p: id(p) in layers, "none": lambda p: False}[hooked]
    assert all(bool(p._backward_hooks) == expected(p) for p in model.parameters())


def test_only_the_gradient_that_becomes_grad_is_copied():
    """`copy_first_gradient`: the first backward's gradient is not kept as `.grad` itself, as it is without the hook
    (in a graphed backward, the pool's buffer); the second is added into `.grad` in place; the sums are right."""
    from training.compilation import copy_first_gradient

    def two_backwards(param):
        emitted = []  # data pointers only: a held reference would make AccumulateGrad copy on its own

        class Emit(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                out = grad * 1.0
                emitted.append(out.data_ptr())
                return out

        Emit.apply(param).mul(2.0).sum().backward()
        first = param.grad.data_ptr()
        Emit.apply(param).mul(3.0).sum().backward()
        assert param.grad.data_ptr() == first and torch.equal(param.grad, torch.full((5,), 5.0))
        return emitted[0] == first  # the first gradient kept as .grad itself

    assert two_backwards(torch.nn.Parameter(torch.randn(5)))  # what happens to a graph pool's buffer without a copy
    param = torch.nn.Parameter(torch.randn(5))
    copy_first_gradient(param)
    assert not two_backwards(param)


def test_missing_text_column(offline, capsys, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"content": "Words of a document. " * 50}) + "\n" for _ in range(5)))
    code, err = run_main(["--dataset", str(data), "--output-dir", "out"], capsys)
    assert code == 2 and "--text-column 'text' is not a column of the dataset; its columns are ['content']" in err


def test_empty_dataset(offline, capsys, tmp_path):
    data = tmp_path / "docs"
    data.mkdir()
    (data / "a.txt").write_text("Too short to fill the blocks.")
    code, err = run_main(["--dataset", str(data), "--output-dir", "out"], capsys)
    assert code == 2 and "the dataset is too small: it packs into 0 blocks of --seq-len 64" in err, err
    (tmp_path / "empty.jsonl").touch()
    code, err = run_main(["--dataset", str(tmp_path / "empty.jsonl"), "--output-dir", "out"], capsys)
    assert code == 2 and "empty.jsonl: the dataset is empty (every file has 0 bytes)" in err, err
    (tmp_path / "broken.jsonl").write_text('{"text": "unclosed\n')
    code, err = run_main(["--dataset", str(tmp_path / "broken.jsonl"), "--output-dir", "out"], capsys)
    assert code == 2 and "broken.jsonl: cannot be read as json files" in err, err


def test_output_dir_with_other_runs_checkpoint(offline, capsys, tmp_path):
    checkpoint = tmp_path / "out" / "checkpoints" / "step_00000005"
    checkpoint.mkdir(parents=True)
    run = pretrain.run_identity(pretrain.parse_args([*SHORT, "--seq-len", "32"]))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 5, "run": run,
                                                                "hardware": {"num_processes": 1}}))
    code, err = run_main(["--output-dir", "out"], capsys)
    assert code == 2 and "already holds checkpoints (latest step_00000005); pass --resume" in err
    code, err = run_main(["--output-dir", "out", "--resume"], capsys)
    assert code == 2 and "holds a checkpoint of an incompatible run (seq_len: 32 there, 64 here)" in err


def test_trainer_example(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.trainer_example", "--output-dir", str(tmp_path / "t"),
                           "--max-steps", "30", "--batch-size", "8"], cwd=REPO, check=False, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    loss = float(re.search(r"held-out loss after 30 steps: ([\d.]+)", proc.stdout).group(1))
    assert loss < 6.8  # ln(2048) = 7.6 at the start
    assert (tmp_path / "t" / "model.safetensors").is_file() and (tmp_path / "t" / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "fsdp2"])
def test_launch_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "training" / "configs" / f"{name}.yaml"))
    assert config.mixed_precision == "bf16"
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "FlowHNDecoderLayer"


def test_document_masking_restarts_positions_after_each_eos():
    blocks = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 0, 4], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    inputs = model_inputs(blocks, eos_token_id=0)
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert "position_ids" not in model_inputs(blocks, eos_token_id=None)


def test_tiny_run_with_document_masking(tmp_path):
    proc = train_cli(*SHORT, "--output-dir", tmp_path / "run", "--max-steps", 4, "--document-masking")
    assert "done:" in proc.stdout
