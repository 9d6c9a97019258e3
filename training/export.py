"""`flowhn-export CHECKPOINT OUT_DIR`: a `flowhn-train` checkpoint to a Hub-ready folder.

The folder holds safetensors weights (sharded when large), `config.json` with `auto_map` and the
flat modeling code (both written by `save_pretrained`), the tokenizer, `generation_config.json`
and a model card `README.md` rendered from `model_cards/<preset>.md`. `--push-to-hub REPO_ID`
then uploads it with the token from the environment (`HF_TOKEN` or `huggingface-cli login`).
"""

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import flowhn_hf  # noqa: F401  (registers the flowhn model type)
from training.checkpoint import read_state, resolve_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CARD_PRESETS = ("tiny", "135m", "350m", "1b")


def _checkpoint_weights(checkpoint: Path) -> dict:
    """The model state dict saved by `accelerator.save_state`, merging FSDP shards when needed."""
    if (checkpoint / "model.safetensors").is_file():
        weights = load_file(checkpoint / "model.safetensors")
    elif (checkpoint / "pytorch_model_fsdp.bin").is_file():  # FSDP full state dict
        weights = torch.load(checkpoint / "pytorch_model_fsdp.bin", map_location="cpu", weights_only=True)
    elif (checkpoint / "pytorch_model_fsdp_0").is_dir():  # FSDP sharded state dict (torch.distributed.checkpoint)
        # dcp_to_torch_save reads the shards in this process alone; accelerate's merge_fsdp_weights would also enter
        # a barrier, which hangs or desyncs a distributed run exporting from its main process only.
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", Path(tmp) / "model.pt")
            weights = torch.load(Path(tmp) / "model.pt", map_location="cpu", weights_only=True)["model"]
    else:
        raise ValueError(f"CHECKPOINT {checkpoint}: no model weights (model.safetensors or an FSDP state dict)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}


def load_checkpoint(path) -> tuple[torch.nn.Module, object, dict]:
    """Model (float32, eval mode), tokenizer and trainer state of a flowhn-train checkpoint."""
    checkpoint = resolve_checkpoint(path)
    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(_checkpoint_weights(checkpoint), strict=False)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
    if unexpected or set(missing) - tied:
        raise ValueError(f"CHECKPOINT {checkpoint}: weights do not match the config "
                         f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    state = read_state(checkpoint)
    return model.eval(), tokenizer, state


def render_model_card(state: dict, config, model_name: str, repo_id: str, license: str) -> str:
    """README.md of the export: YAML metadata plus the preset's template filled in."""
    from huggingface_hub import ModelCard, ModelCardData

    preset = state["preset"] if state["preset"] in CARD_PRESETS else "tiny"
    try:
        cards = resources.files("flowhn_hf.model_cards")
    except ModuleNotFoundError:  # a source checkout on PYTHONPATH, not pip-installed: the folder beside flowhn_hf
        cards = Path(__file__).resolve().parents[1] / "model_cards"
    template = cards.joinpath(f"{preset}.md").read_text()
    run = state["run"]
    dataset = run["dataset"]
    hub_dataset = dataset is not None and not Path(dataset).exists()
    data = ModelCardData(
        library_name="transformers", license=license, pipeline_tag="text-generation", model_name=model_name,
        tags=["flowhn", "hybrid", "deltanet", "linear-attention", f"split-{config.split_mode}"],
        datasets=[dataset] if hub_dataset else None)
    card = ModelCard.from_template(
        data, template_str=template, model_name=model_name, repo_id=repo_id, config=config, state=state,
        dataset=dataset if dataset is not None else "the built-in Shakespeare corpus of flowhn-train",
        millions=f"{state['num_parameters'] / 1e6:.1f}")
    return str(card)


def export(checkpoint, out_dir, dtype: str = "float32", max_shard_size: str = "2GB", repo_id: str | None = None,
           license: str = "apache-2.0", eval_results_file=None, name: str | None = None) -> Path:
    """Write the Hub-ready folder `out_dir` from a flowhn-train checkpoint (or run directory). The card calls the
    model `name` (default: the folder's name) and loads it from `repo_id` (default: the name)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"OUT_DIR {out} exists and is not empty")
    results = None
    if eval_results_file is not None:
        try:
            results = json.loads(Path(eval_results_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--eval-results {eval_results_file}: cannot be read: {e}") from e
        if not isinstance(results, dict) or not {"results", "configs", "n-shot"} <= results.keys():
            raise ValueError(f"--eval-results {eval_results_file}: not an lm-eval / flowhn-eval results JSON "
                             "(it needs the keys results, configs and n-shot)")
    model, tokenizer, state = load_checkpoint(checkpoint)
    model.to(DTYPES[dtype])
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=256)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)
    name = name or out.resolve().name
    card = render_model_card(state, model.config, name, repo_id or name, license)
    (out / "README.md").write_text(card)
    if results is not None:
        from flowhn_hf.evaluate import update_model_card

        update_model_card(out, results)
    return out


def push_to_hub(out_dir, repo_id: str, private: bool) -> str:
    """Upload `out_dir` to `repo_id` (created if needed); raise RuntimeError saying why on failure."""
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise RuntimeError(f"pushing to the Hub repo {repo_id!r} needs a token: set HF_TOKEN or run `hf auth login`")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload FlowHN checkpoint exported by flowhn-export")
    except Exception as e:  # network, auth, permission, bad repo id: all reported the same way
        raise RuntimeError(f"pushing {out_dir} to the Hub repo {repo_id!r} failed: {type(e).__name__}: {e}") from e
    return commit.commit_url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flowhn-export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory or a flowhn-train run directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must be new or empty)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file before sharding")
    p.add_argument("--license", default="apache-2.0", help="license in the model card metadata")
    p.add_argument("--eval-results", metavar="JSON", help="lm-eval results (flowhn-eval --output) for model-index")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub model repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    args = p.parse_args(argv)
    if args.private and not args.push_to_hub:
        p.error("--private needs --push-to-hub REPO_ID")
    try:
        out = export(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size, args.push_to_hub,
                     args.license, args.eval_results)
    except ValueError as e:
        print(f"flowhn-export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, args.private)
        except RuntimeError as e:
            print(f"flowhn-export: error: {e}\nthe local export in {out} is complete and untouched; "
                  "push it later with `hf upload REPO_ID OUT_DIR`", file=sys.stderr)
            return 1
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
