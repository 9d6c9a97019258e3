"""flowhn-export: the Hub-ready folder, loading it with and without the package, sharding, the card, push errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_bare
from huggingface_hub import ModelCard
from test_training import SHORT, train_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from training import export

PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train_cli(*SHORT, "--output-dir", run, "--max-steps", 3, "--save-every", 3)
    return run / "checkpoints" / "step_00000003"


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Token ids of PROMPT and the logits of the checkpoint's model on them."""
    model, tokenizer, _ = export.load_checkpoint(checkpoint)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model(ids).logits


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "flowhn-tiny-test"
    cli = Path(sys.executable).with_name("flowhn-export")
    proc = subprocess.run([str(cli), str(checkpoint.parent.parent), str(out)], check=False, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def test_export_writes_a_hub_folder(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_flowhn.py", "modeling_flowhn.py", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "README.md"} <= names
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "flowhn"
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_flowhn.")
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == config["eos_token_id"]
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == config["max_position_embeddings"]
    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert "flowhn" in card.data.tags and card.data.pipeline_tag == "text-generation"
    assert card.data.eval_results is None
    assert "preset `tiny`" in card.text and "| tokens seen | 768 (3 steps of 64-token blocks) |" in card.text
    assert 'from_pretrained("flowhn-tiny-test", trust_remote_code=True)' in card.text


def test_loads_with_the_package_without_remote_code(exported, reference):
    ids, logits = reference
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model).__module__ == "flowhn_hf.modeling_flowhn"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer(PROMPT, return_tensors="pt").input_ids.equal(ids)


def test_loads_in_a_fresh_virtualenv(exported, reference, bare_python, tmp_path):
    ids, logits = reference
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained({str(exported)!r}, trust_remote_code=True)  # as the model card has it
ids = tokenizer({PROMPT!r}, return_tensors="pt").input_ids
with torch.no_grad():
    torch.save({{"ids": ids, "logits": model(ids).logits, "module": type(model).__module__}}, "out.pt")
"""
    proc = run_bare(bare_python, code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    got = torch.load(tmp_path / "out.pt")
    assert not got["module"].startswith("flowhn_hf")
    assert got["ids"].equal(ids)
    torch.testing.assert_close(got["logits"], logits, rtol=0, atol=1e-5)


LM_EVAL_RESULTS = {
    "results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.3125, "acc_stderr,none": 0.01}},
    "configs": {"arc_easy": {"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy", "test_split": "test"}},
    "n-shot": {"arc_easy": 0},
}


def test_sharded_bf16_export_with_eval_results(checkpoint, reference, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(LM_EVAL_RESULTS))
    out = export.export(checkpoint, tmp_path / "out", dtype="bfloat16", max_shard_size="300KB",
                        repo_id="someone/flowhn-tiny", eval_results_file=results)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids, logits = reference
    with torch.no_grad():
        torch.testing.assert_close(model.float()(ids).logits, logits, rtol=0.05, atol=0.05)
    card = ModelCard.load(out / "README.md")
    (result,) = card.data.eval_results
    assert (result.dataset_name, result.metric_type, result.metric_value) == ("arc_easy", "acc", 0.3125)
    assert "model-index:" in (out / "README.md").read_text()
    assert 'from_pretrained("someone/flowhn-tiny", trust_remote_code=True)' in card.text


def test_failed_push_keeps_the_local_export(checkpoint, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_real_token")
    out = tmp_path / "out"
    assert export.main([str(checkpoint), str(out), "--push-to-hub", "someone/flowhn-tiny", "--private"]) == 1
    err = capsys.readouterr().err
    assert "pushing" in err and "to the Hub repo 'someone/flowhn-tiny' failed" in err
    assert f"the local export in {out} is complete and untouched" in err
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "flowhn"


def test_bad_export_arguments(checkpoint, tmp_path, capsys):
    assert export.main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "neither a flowhn-train checkpoint" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    assert export.main([str(checkpoint), str(tmp_path / "full")]) == 2
    assert f"OUT_DIR {tmp_path / 'full'} exists and is not empty" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_of_an_fsdp_sharded_checkpoint(checkpoint, reference, tmp_path):
    """A checkpoint whose weights are an FSDP sharded state dict (DCP) is merged on export."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    sharded = tmp_path / "step_00000003"
    shutil.copytree(checkpoint, sharded)
    weights = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    dcp.save({"model": weights}, storage_writer=dcp.FileSystemWriter(sharded / "pytorch_model_fsdp_0"), no_dist=True)
    out = export.export(sharded, tmp_path / "out")
    ids, logits = reference
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, logits, rtol=0, atol=1e-5)


def test_bad_eval_results(checkpoint, tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"acc": 0.5}))
    assert export.main([str(checkpoint), str(tmp_path / "out"), "--eval-results", str(tmp_path / "results.json")]) == 2
    assert "not an lm-eval / flowhn-eval results JSON (it needs the keys results, configs and n-shot)" in (
        capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_push_without_a_token(checkpoint, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert export.main([str(checkpoint), str(tmp_path / "out"), "--push-to-hub", "someone/flowhn-tiny"]) == 1
    err = capsys.readouterr().err
    assert "pushing to the Hub repo 'someone/flowhn-tiny' needs a token: set HF_TOKEN or run `hf auth login`" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()
