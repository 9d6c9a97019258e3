"""lm-evaluation-harness on FlowHN: local tasks scored against the model itself, batch-size invariance, flowhn-eval."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install '.[eval]'")

import yaml  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import flowhn_hf  # noqa: E402
from flowhn_hf import evaluate as flowhn_eval  # noqa: E402

TASKS_DIR = Path(__file__).parent / "eval_tasks"
TASKS = ["flowhn_mc", "flowhn_gen", "flowhn_ppl"]
GEN_STOPS = ["\n", "."]  # flowhn_gen.yaml's `until`
MAX_GEN_TOKS = 12  # flowhn_gen.yaml's `max_gen_toks`


def _docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / f"{name}.jsonl").read_text().splitlines()]


def _build_tokenizer():
    """A byte-level BPE trained in well under a second on the task texts (ASCII only, so decoding is exact)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [d["question"] + " " + " ".join(d["choices"]) for d in _docs("mc")]
    texts += [d["prompt"] + " " + d["answer"] + "." for d in _docs("gen")] + [d["text"] for d in _docs("ppl")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer():
    return _build_tokenizer()


def _fit(model, tokenizer, steps: int = 60) -> None:
    """Overfit the task texts for a few seconds, so that answers, and with them the stop sequences, differ per row."""
    texts = [d["prompt"] + " " + d["answer"] + ".\n" for d in _docs("gen")]
    texts += [d["question"] + " " + d["choices"][d["label"]] + ".\n" for d in _docs("mc")]
    texts += [d["text"] for d in _docs("ppl")]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = flowhn_hf.preset_config("tiny", vocab_size=len(tokenizer))
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    model = flowhn_hf.FlowHNForCausalLM(config)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    _fit(model, tokenizer)
    return model


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "flowhn-tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(model, tokenizer):
    """simple_evaluate on the in-memory model at batch size 1 and 8, with per-sample logs."""
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return {
        bs: simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs, device="cpu"),
            tasks=TASKS,
            task_manager=task_manager,
            bootstrap_iters=0,
            log_samples=True,
        )
        for bs in (1, 8)
    }


@torch.no_grad()
def _logprob(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one forward pass."""
    logits = model(torch.tensor([context + continuation])).logits[0].double().log_softmax(-1)
    start = len(context) - 1
    return sum(logits[start + i, tok].item() for i, tok in enumerate(continuation))


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str) -> str:
    """Greedy continuation of `prompt`: MAX_GEN_TOKS tokens, or up to EOS."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=MAX_GEN_TOKS, do_sample=False)[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True)


def _cut_at_stop(text: str) -> str:
    """`text` up to its first stop sequence, as lm-eval's generate_until returns it."""
    return text[: min((text.index(s) for s in GEN_STOPS if s in text), default=len(text))]


def _by_doc(run, task):
    return sorted(run["samples"][task], key=lambda s: s["doc_id"])


def _lls(sample) -> list[float]:
    """The log-likelihoods lm-eval logged for one document (multiple choice: one per choice)."""
    return [r[0] if isinstance(r, (list, tuple)) else r for r in sample["filtered_resps"]]


def test_multiple_choice_scores_match_direct_loglikelihoods(runs, model, tokenizer):
    docs = _docs("mc")
    acc = acc_norm = 0
    for doc, sample in zip(docs, _by_doc(runs[1], "flowhn_mc"), strict=True):
        context = tokenizer(doc["question"]).input_ids
        lls = [_logprob(model, context, tokenizer(doc["question"] + " " + c).input_ids[len(context) :])
               for c in doc["choices"]]
        assert _lls(sample) == pytest.approx(lls, abs=1e-4)
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["label"]
    result = runs[1]["results"]["flowhn_mc"]
    assert result["acc,none"] == pytest.approx(acc / len(docs))
    assert result["acc_norm,none"] == pytest.approx(acc_norm / len(docs))


def test_rolling_perplexity_matches_direct_loglikelihoods(runs, model, tokenizer):
    total = words = nbytes = 0.0
    for doc in _docs("ppl"):
        ids = tokenizer(doc["text"]).input_ids
        assert len(ids) < model.config.max_position_embeddings  # one rolling window per document
        total += _logprob(model, [tokenizer.eos_token_id], ids)  # lm-eval's prefix token: BOS, else EOS
        words += len(re.split(r"\s+", doc["text"]))
        nbytes += len(doc["text"].encode())
    result = runs[1]["results"]["flowhn_ppl"]
    assert result["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert result["byte_perplexity,none"] == pytest.approx(math.exp(-total / nbytes), rel=1e-4)
    assert result["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)


def test_generation_matches_direct_greedy_decoding(runs, model, tokenizer):
    docs = _docs("gen")
    full = [_greedy(model, tokenizer, doc["prompt"]) for doc in docs]
    assert sum(_cut_at_stop(text) != text for text in full) >= len(docs) // 2  # the stop sequences do cut
    samples = _by_doc(runs[1], "flowhn_gen")
    assert [s["resps"][0][0] for s in samples] == [_cut_at_stop(text) for text in full]
    exact = sum(_cut_at_stop(text).strip().lower() == doc["answer"] for text, doc in zip(full, docs))
    assert exact > 0
    assert runs[1]["results"]["flowhn_gen"]["exact_match,strip"] == pytest.approx(exact / len(docs))


def test_batch_size_does_not_change_scores(runs):
    for task in TASKS:
        one, eight = runs[1]["results"][task], runs[8]["results"][task]
        assert one.keys() == eight.keys()
        for key, value in one.items():
            if isinstance(value, float):
                assert eight[key] == pytest.approx(value, rel=1e-5), (task, key)
    for task in ("flowhn_mc", "flowhn_ppl"):
        for a, b in zip(_by_doc(runs[1], task), _by_doc(runs[8], task), strict=True):
            assert _lls(b) == pytest.approx(_lls(a), abs=1e-4)
    assert [s["filtered_resps"] for s in _by_doc(runs[1], "flowhn_gen")] == [
        s["filtered_resps"] for s in _by_doc(runs[8], "flowhn_gen")
    ]


def _card_metadata(path: Path) -> dict:
    text = (path / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_flowhn_eval_writes_results_table_and_model_card(checkpoint, runs, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = [str(checkpoint), "--tasks", "flowhn_mc,flowhn_gen", "--include-path", str(TASKS_DIR)]
    argv += ["--batch-size", "8", "--device", "cpu", "--output", str(out), "--update-model-card"]
    assert flowhn_eval.main(argv) == 0

    results = json.loads(out.read_text())
    for task in ("flowhn_mc", "flowhn_gen"):
        for key, value in runs[1]["results"][task].items():
            if "," in key and "_stderr" not in key:
                assert results["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
    table = out.with_suffix(".md").read_text()
    assert "|flowhn_mc" in table.replace(" ", "") and "acc_norm" in table
    assert "flowhn_mc" in capsys.readouterr().out

    (entry,) = _card_metadata(checkpoint)["model-index"]
    assert entry["name"] == checkpoint.name
    scores = {(r["task"]["name"], m["type"]): m["value"] for r in entry["results"] for m in r["metrics"]}
    assert scores[("flowhn_mc", "acc")] == pytest.approx(results["results"]["flowhn_mc"]["acc,none"], abs=1e-4)
    assert ("flowhn_gen", "exact_match") in scores

    # A later run adds its tasks and replaces same-metric scores; earlier ones stay.
    mc = {**runs[8]["results"]["flowhn_mc"], "acc,none": 0.5}
    later = dict(runs[8], results={**runs[8]["results"], "flowhn_mc": mc})
    flowhn_eval.update_model_card(checkpoint, later)
    (entry,) = _card_metadata(checkpoint)["model-index"]
    scores = {(r["task"]["name"], m["type"]): m["value"] for r in entry["results"] for m in r["metrics"]}
    assert scores[("flowhn_mc", "acc")] == 0.5
    expected = {("flowhn_gen", "exact_match"), ("flowhn_ppl", "word_perplexity"), ("flowhn_mc", "acc_norm")}
    assert expected <= scores.keys()
    with pytest.raises(ValueError, match="--limit"):
        flowhn_eval.update_model_card(checkpoint, dict(runs[1], config={**runs[1]["config"], "limit": 3}))
    body = (checkpoint / "README.md").read_text()
    assert body.count(flowhn_eval.CARD_START) == 1 and "| flowhn_ppl | word_perplexity | 0 |" in body


def test_lm_eval_cli_loads_checkpoint_with_remote_code(checkpoint, runs, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` on a saved checkpoint."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={checkpoint},trust_remote_code=True"]
    cmd += ["--tasks", "flowhn_mc", "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "4"]
    cmd += ["--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(result_file.read_text())["results"]["flowhn_mc"]["acc,none"]
    assert acc == pytest.approx(runs[1]["results"]["flowhn_mc"]["acc,none"])


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        flowhn_eval.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_rejects_paths_that_are_not_flowhn_checkpoints(tmp_path, checkpoint, capsys):
    missing = tmp_path / "nowhere"
    assert "does not exist" in _cli_error([str(missing), "--tasks", "flowhn_mc"], capsys)

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    err = _cli_error([str(llama), "--tasks", "flowhn_mc"], capsys)
    assert "not a FlowHN checkpoint" in err and "'llama'" in err

    assert "no config.json" in _cli_error([str(tmp_path), "--tasks", "flowhn_mc"], capsys)

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((checkpoint / name).read_bytes())
    assert "has no tokenizer" in _cli_error([str(no_tokenizer), "--tasks", "flowhn_mc"], capsys)


def test_rejects_unknown_task(checkpoint, capsys):
    err = _cli_error([str(checkpoint), "--tasks", "flowhn_mc,flowhn_mcq", "--include-path", str(TASKS_DIR)], capsys)
    assert "unknown task in --tasks: 'flowhn_mcq'" in err and "did you mean flowhn_mc" in err


def test_rejects_bad_arguments(checkpoint, tmp_path, capsys):
    assert "--batch-size" in _cli_error([str(checkpoint), "--tasks", "flowhn_mc", "--batch-size", "0"], capsys)
    err = _cli_error([str(checkpoint), "--tasks", "flowhn_mc", "--include-path", str(tmp_path / "none")], capsys)
    assert "--include-path" in err and "not a directory" in err
    error = _cli_error([str(checkpoint), "--tasks", "flowhn_mc", "--device", "gpu"], capsys)
    assert "--device 'gpu' is not a torch device" in error
    err = _cli_error([str(checkpoint), "--tasks", "flowhn_mc", "--limit", "3", "--update-model-card"], capsys)
    assert "--update-model-card" in err and "--limit" in err


def test_missing_eval_extra_names_the_extra(checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    err = _cli_error([str(checkpoint), "--tasks", "flowhn_mc"], capsys)
    assert "lm-evaluation-harness" in err and "pip install 'flowhn[eval]'" in err
