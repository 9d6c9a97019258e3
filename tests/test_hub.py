"""Saving, Auto-class registration, loading with trust_remote_code where flowhn is not installed, and Trainer."""

import json
import os
import shutil
import subprocess
import sys

import torch

import flowhn_hf  # noqa: F401  (registers the Auto classes)
from conftest import REPO, run_bare
from flowhn_hf import FlowHNForCausalLM, FlowHNModel, preset_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, Trainer, TrainingArguments


def saved_model(tmp_path, **overrides):
    torch.manual_seed(0)
    model = FlowHNForCausalLM(preset_config("tiny", **overrides)).eval()
    model.save_pretrained(tmp_path)
    return model


def test_auto_classes():
    fields = {k: v for k, v in preset_config("tiny").to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("flowhn", **fields)
    assert isinstance(AutoModel.from_config(config), FlowHNModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), FlowHNForCausalLM)


def test_the_kernels_folder_does_not_shadow_hugging_faces_kernels(tmp_path):
    """Run from the repository root, `import kernels` (which transformers does whenever Hugging Face's `kernels` is
    installed, and 5.25 requires it) finds this repository's kernels/ folder first on sys.path: the folder hands over
    to the installed package (a stand-in here), past any other checkout's kernels/ on the path, or stays empty where
    there is none; transformers' models import."""

    def run_from_root(script, **env):
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                             text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr
        return run.stdout.split()

    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    script = "import kernels, flowhn_kernels; print(getattr(kernels, 'STAND_IN', False), flowhn_kernels.delta_rule)"
    assert run_from_root(script, PYTHONPATH=str(tmp_path))[:2] == ["True", "<function"]  # behind the root's entry
    other = tmp_path / "other" / "kernels"  # a second checkout between them, as an A/B's two trees
    other.mkdir(parents=True)
    for name in ("__init__.py", "delta_rule.py"):
        shutil.copyfile(REPO / "kernels" / name, other / name)
    paths = os.pathsep.join([str(other.parent), str(tmp_path)])
    assert run_from_root(script, PYTHONPATH=paths)[:2] == ["True", "<function"]
    script = "import transformers.modeling_utils, flowhn_hf, kernels; print(hasattr(kernels, 'delta_rule'))"
    assert run_from_root(script) == ["False"]  # this environment's own `kernels`, or none


def test_save_pretrained_is_hub_ready_and_round_trips(tmp_path):
    model = saved_model(tmp_path, split_mode="alternating", delta_rank=2)
    files = {p.name for p in tmp_path.iterdir()}
    expected = {"model.safetensors", "config.json", "configuration_flowhn.py", "modeling_flowhn.py", "delta_rule.py"}
    assert expected <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_flowhn.FlowHNForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is FlowHNForCausalLM
    x = torch.randint(0, 1024, (2, 45))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_remote_code_loads_without_the_package(tmp_path, bare_python):
    model = saved_model(tmp_path / "ckpt", split_mode="flop_aware_circulating")
    x = torch.randint(0, 1024, (2, 45), generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x).logits, tmp_path / "expected.pt")
    code = f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
assert "flowhn_hf" not in type(model).__module__, type(model).__module__
with torch.no_grad():
    logits = model(torch.load({str(tmp_path / "x.pt")!r})).logits
torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=0)
model.generate(torch.load({str(tmp_path / "x.pt")!r})[:, :5], max_new_tokens=3, do_sample=False)
model.save_pretrained({str(tmp_path / "resaved")!r})
print("remote code ok")
"""
    result = run_bare(bare_python, code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code ok" in result.stdout
    assert (tmp_path / "resaved" / "delta_rule.py").exists()


class TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, n=16, length=32):
        self.data = torch.randint(0, 1024, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def test_trainer_runs_a_few_steps(tmp_path):
    torch.manual_seed(0)
    model = FlowHNForCausalLM(preset_config("tiny"))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=TokenBlocks())
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and losses[-1] < losses[0] and result.global_step == 6
