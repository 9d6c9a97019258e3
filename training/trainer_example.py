"""Pretrain the tiny FlowHN preset with `transformers.Trainer` on the built-in corpus.

    python -m training.trainer_example --output-dir runs/trainer-tiny

The same data pipeline as flowhn-train (BPE tokenizer trained on the corpus, documents joined
with EOS and packed into blocks, the first blocks held out); the model saved at the end is an
ordinary `save_pretrained` folder that loads with AutoModelForCausalLM.
"""

import argparse

import torch
from transformers import Trainer, TrainingArguments

import flowhn_hf
from training.corpus import train_bpe_tokenizer
from training.data import load_text_dataset, pack_documents


def collate(rows):
    ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": ids, "labels": ids}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/trainer-tiny")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-blocks", type=int, default=32)
    args = p.parse_args(argv)

    raw = load_text_dataset(None)
    tokenizer = train_bpe_tokenizer((row["text"] for row in raw), vocab_size=2048)
    blocks = pack_documents(raw, tokenizer, "text", args.seq_len)
    eval_ds, train_ds = blocks.select(range(args.eval_blocks)), blocks.select(range(args.eval_blocks, len(blocks)))

    config = flowhn_hf.preset_config("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = flowhn_hf.FlowHNForCausalLM(config)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=3e-3, lr_scheduler_type="cosine",
        warmup_steps=min(20, args.max_steps), weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        bf16=torch.cuda.is_available(), logging_steps=max(1, args.max_steps // 10), eval_strategy="no",
        save_strategy="no", report_to="none", seed=0, dataloader_pin_memory=torch.cuda.is_available())
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collate)
    trainer.train()
    metrics = trainer.evaluate()
    print(f"held-out loss after {args.max_steps} steps: {metrics['eval_loss']:.4f}")
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    return metrics


if __name__ == "__main__":
    main()
