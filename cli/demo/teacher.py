"""The demo teacher: a small Llama trained from scratch on worked additions, by this script.

`potstill demo` ships the checkpoint this makes (cli/demo/teacher_checkpoint/), because training it takes a few
minutes on a 2-core CPU; rerun it to reproduce that checkpoint:

    python -m potstill.cli.demo.teacher --out cli/demo/teacher_checkpoint
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable

from potstill.cli.demo import arithmetic

SPECIALS = ["<pad>", "<s>", "</s>"]
TRAIN_SEED, EVAL_SEED = 1234, 99


def build_tokenizer(seed: int = 0, vocab_size: int = 300, *, split_digits: bool = True):
    """Byte-level BPE with one token per digit (so numbers are read digit by digit), BOS added.
    `split_digits=False` lets the merges join digits into multi-digit tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = []
    for _ in range(2000):
        a, b = rng.randrange(1000, 10000), rng.randrange(1000, 10000)
        corpus.append(arithmetic.question(a, b) + arithmetic.COT_TRIGGER + arithmetic.worked_solution(a, b))
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def model_config(vocab_size: int, hidden: int, layers: int, heads: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def train_on_pairs(
    model, tok, make_batch: Callable[[], list[tuple[str, str]]], steps: int, *, lr: float = 3e-3,
    log: Callable[[int, float], None] | None = None,
) -> None:
    """Cross-entropy on the answer of each (prompt, answer) pair that `make_batch` returns, the prompt
    masked out: AdamW, gradients clipped at 1, a one-cycle schedule. `log(step, loss)` every 100 steps
    and at the last."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        pairs = make_batch()
        prompts = [tok(p).input_ids for p, _ in pairs]
        targets = [[*tok(a, add_special_tokens=False).input_ids, tok.eos_token_id] for _, a in pairs]
        width = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
        ids = torch.full((len(pairs), width), tok.pad_token_id)
        labels = torch.full((len(pairs), width), -100)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
            mask[i, : len(p) + len(t)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(step, loss.item())


def train_teacher(out: str, *, steps: int = 1600, batch: int = 32, lr: float = 3e-3, seed: int = 0) -> float:
    """Train the teacher with plain next-token cross-entropy on worked solutions; returns accuracy."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(TRAIN_SEED)
    tok = build_tokenizer()
    model = LlamaForCausalLM(model_config(len(tok), hidden=128, layers=4))

    def make_batch() -> list[tuple[str, str]]:
        pairs = [(rng.randrange(1000, 10000), rng.randrange(1000, 10000)) for _ in range(batch)]
        return [(arithmetic.question(a, b) + arithmetic.COT_TRIGGER, arithmetic.worked_solution(a, b)) for a, b in pairs]

    start = time.time()
    train_on_pairs(
        model, tok, make_batch, steps, lr=lr,
        log=lambda step, loss: print(f"step {step:5d}  loss {loss:.4f}  {time.time() - start:.0f}s", flush=True),
    )
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    accuracy = solve_accuracy(model, tok, arithmetic.problems(EVAL_SEED, 200), cot=True)
    print(f"teacher accuracy on 200 held-out problems: {accuracy:.3f}")
    return accuracy


def solve_accuracy(model, tok, pairs: list[tuple[int, int]], *, cot: bool, batch: int = 100, max_new_tokens: int = 96) -> float:
    """Greedy-decode each problem and compare the parsed answer with the true sum."""
    import torch

    correct = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        texts = [arithmetic.question(a, b) + (arithmetic.COT_TRIGGER if cot else "") for a, b in chunk]
        rows = [tok(t).input_ids for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
        for (a, b), row in zip(chunk, out[:, width:], strict=True):
            correct += arithmetic.parse_answer(tok.decode(row, skip_special_tokens=True)) == a + b
    return correct / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "teacher_checkpoint"))
    parser.add_argument("--steps", type=int, default=1600)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)  # the checkpoint was made with 2 threads; same threads, same numbers
    train_teacher(args.out, steps=args.steps)


if __name__ == "__main__":
    main()
