"""Shared pieces of the fidelity bench (bench/fidelity.py): its scales and stores, the corpus and
tokenizer, the trained teacher, `potstill generate` into one store per variant, the students'
training, and the held-out evaluation every experiment reports with."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from potstill.share import store_info
from potstill.store import open_store
from potstill.student_train.data import StoreDataset
from potstill.student_train.losses import masked_mean
from potstill.student_train.model import DistillModel
from potstill.student_train.objective import Objective, distill_loss


@dataclass
class Scale:
    vocab: int = 4096
    seq: int = 128  # tokens per block
    teacher_hidden: int = 192
    teacher_layers: int = 4
    teacher_steps: int = 600
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    student_hidden: int = 96
    student_layers: int = 2
    student_steps: int = 400
    student_batch: int = 16
    student_lr: float = 3e-3
    student_final_lr: float = 0.1  # the cosine schedule ends at this fraction of student_lr
    student_beta2: float = 0.95  # AdamW's second-moment decay
    student_head_lr: float = 1.0  # the output layer's learning rate, a multiple of student_lr
    student_head_beta2: float | None = None  # the output layer's AdamW second-moment decay (None: student_beta2)
    student_head_wd: float = 0.1  # the output layer's AdamW weight decay (the others': student_wd)
    student_wd: float = 0.1  # AdamW's weight decay of every other parameter
    transfer_blocks: int = 1024  # blocks the stores score, i.e. the students' whole training set
    heldout_blocks: int = 256
    heldout_fraction: float = 0.1  # of the corpus files
    seeds: int = 2
    tokenizer_chars: int = 6_000_000  # characters of the train split the tokenizer is trained on
    eval_steps: tuple[int, ...] = (50, 100, 200, 300)  # held-out CE during training (share of the gain vs steps)


SCALES = {
    "cpu": Scale(),
    # The CPU scale with a 4x larger transfer set: the students' 400 steps see each record 1.6 times
    # instead of 6.25 (does the gap to full KD come from revisiting the same fixed draws?).
    "cpu-wide": Scale(transfer_blocks=4096),
    "quick": Scale(teacher_steps=60, student_steps=40, transfer_blocks=128, heldout_blocks=32, seeds=1,
                   tokenizer_chars=1_000_000, eval_steps=(10, 20, 30)),
    # The quick students with a teacher trained long enough to predict held-out text better than they do.
    "short": Scale(teacher_steps=200, student_steps=80, transfer_blocks=128, heldout_blocks=32, tokenizer_chars=1_000_000,
                   eval_steps=(10, 20, 40, 60)),
    # What 2 busy, shared CPU cores finish in well under an hour: a shorter-trained teacher, shorter students.
    "small": Scale(teacher_steps=120, teacher_batch=16, student_steps=100, student_batch=8, transfer_blocks=256,
                   heldout_blocks=64, tokenizer_chars=2_000_000, eval_steps=(25, 50, 75)),
    "gpu": Scale(vocab=8192, seq=256, teacher_hidden=512, teacher_layers=8, teacher_steps=6000, teacher_batch=64,
                 teacher_lr=1e-3, student_hidden=256, student_layers=4, student_steps=3000, student_batch=32,
                 student_lr=1e-3, transfer_blocks=16384, heldout_blocks=1024, seeds=3, tokenizer_chars=20_000_000,
                 eval_steps=(250, 500, 1000, 2000)),
    # `--real-teacher DIR --students`: the teacher is DIR's (its tokenizer and vocabulary; the teacher and
    # tokenizer fields are unused), the student a small Llama over that vocabulary.
    "real": Scale(student_hidden=128, student_steps=300, student_batch=8, transfer_blocks=512, heldout_blocks=64,
                  eval_steps=(50, 100, 200)),
    "real-quick": Scale(student_hidden=64, student_steps=20, student_batch=4, transfer_blocks=16, heldout_blocks=4,
                        seeds=1, eval_steps=(10,)),
}

STORES = {  # store name (= variant name) -> generate settings; every sampled store uses the packed codec
    "top8": dict(targets="topk", top_k=8),
    "top32": dict(targets="topk", top_k=32),
    "top64": dict(targets="topk", top_k=64),
    "sampled12": dict(targets="sampled", samples=12, sampler="iid", codec="packed"),
    "sampled50": dict(targets="sampled", samples=50, sampler="iid", codec="packed"),
    "systematic12": dict(targets="sampled", samples=12, sampler="systematic", codec="packed"),
    "stratified12": dict(targets="sampled", samples=12, sampler="stratified", codec="packed"),
    "systematic24": dict(targets="sampled", samples=24, sampler="systematic", codec="packed"),
    "systematic48": dict(targets="sampled", samples=48, sampler="systematic", codec="packed"),
    "systematic56": dict(targets="sampled", samples=56, sampler="systematic", codec="packed"),
    "systematic64": dict(targets="sampled", samples=64, sampler="systematic", codec="packed"),
    "systematic72": dict(targets="sampled", samples=72, sampler="systematic", codec="packed"),
    "systematic76": dict(targets="sampled", samples=76, sampler="systematic", codec="packed"),
    "systematic80": dict(targets="sampled", samples=80, sampler="systematic", codec="packed"),
    "systematic128": dict(targets="sampled", samples=128, sampler="systematic", codec="packed"),
    "systematic256": dict(targets="sampled", samples=256, sampler="systematic", codec="packed"),
    # Far more draws than any byte budget allows: how close do unbiased draws get when variance is ~0?
    "systematic1024": dict(targets="sampled", samples=1024, sampler="systematic", codec="packed"),
    "hybrid2-systematic12": dict(targets="hybrid", top_k=2, samples=12, sampler="systematic", codec="packed"),
    "hybrid4-systematic8": dict(targets="hybrid", top_k=4, samples=8, sampler="systematic", codec="packed"),
}
# Every variant the bench knows; the default runs the sampled ones (top-K lost to sampled targets in
# earlier runs of this bench: pass them with --variants to compare again).
ALL_VARIANTS = ["ce", "full", "top8", "top8-notail", "top32", "top32-notail", "top64", "top64-notail", *STORES.keys()]
ALL_VARIANTS = list(dict.fromkeys(ALL_VARIANTS))
VARIANTS = ["ce", "full", "sampled12", "systematic12", "stratified12", "systematic24", "hybrid2-systematic12",
            "hybrid4-systematic8"]
# Ids by their rank among the transfer set's token frequencies: the 16 most frequent, 16-256, 256-1024,
# the rest. Where a variant's KL to the teacher differs from full KD's says which ids its draws hurt.
FREQUENCY_BANDS = (16, 256, 1024)


def frequency_bands(tokens: np.ndarray, vocab: int) -> np.ndarray:
    """Each id's band (`FREQUENCY_BANDS`) by its rank among the token frequencies of `tokens` (ties: lower id first)."""
    rank = np.empty(vocab, dtype=np.int64)
    rank[np.argsort(-np.bincount(tokens.reshape(-1), minlength=vocab)[:vocab], kind="stable")] = np.arange(vocab)
    return np.searchsorted(np.array(FREQUENCY_BANDS), rank, side="right")


def eval_steps_for(steps: int) -> tuple[int, ...]:
    """Where a run of `steps` student steps measures its held-out CE on the way: at 1/8, 1/4, 1/2 and
    3/4 of it (the CPU scale's 50, 100, 200 and 300 of 400)."""
    return tuple(sorted({steps * k // 8 for k in (1, 2, 4, 6)} - {0, steps}))


def say(message: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- corpus and tokenizer ----------------------------------------------------------------------------
def corpus_files(root: str) -> list[str]:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "idle_test", "site-packages", "__pycache__"))
        out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return out


def is_heldout(path: str, root: str, fraction: float) -> bool:
    rel = os.path.relpath(path, root)
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64 < fraction


def read_texts(files: list[str]) -> list[str]:
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


def train_tokenizer(texts: list[str], vocab: int, chars: int, folder: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    sample, used = [], 0
    for text in texts:
        if used >= chars:
            break
        sample.append(text)
        used += len(text)
    tok.train_from_iterator(sample, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def blocks_of(texts: list[str], tokenizer: Any, seq: int) -> np.ndarray:
    """Every text tokenized, files joined by EOS, cut into [blocks, seq] int64."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [*enc, tokenizer.eos_token_id]
    n = len(ids) // seq
    return np.asarray(ids[: n * seq], dtype=np.int64).reshape(n, seq)


def split_blocks(train_texts: list[str], held_texts: list[str], tokenizer: Any, scale: Scale
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(every train block, the transfer set, the held-out eval blocks): random draws, the same for a
    given tokenizer and scale."""
    train_blocks = blocks_of(train_texts, tokenizer, scale.seq)
    held_blocks = blocks_of(held_texts, tokenizer, scale.seq)
    rng = np.random.default_rng(0)
    heldout = held_blocks[rng.permutation(len(held_blocks))[: scale.heldout_blocks]]
    transfer = train_blocks[rng.permutation(len(train_blocks))[: scale.transfer_blocks]]
    return train_blocks, transfer, heldout


# -- models --------------------------------------------------------------------------------------------
def llama(vocab: int, hidden: int, layers: int, seq: int, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(2, hidden // 48)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(seq, 256), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int, final: float = 0.1
             ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then a cosine from the peak down to `final` × the peak."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_teacher(blocks: np.ndarray, scale: Scale, device: str, folder: str, tokenizer: Any) -> Any:
    model = llama(scale.vocab, scale.teacher_hidden, scale.teacher_layers, scale.seq, seed=1234).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=scale.teacher_lr, weight_decay=0.1, betas=(0.9, 0.95))
    lr = schedule(optimizer, scale.teacher_steps, max(1, scale.teacher_steps // 20))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(blocks))
    started = time.time()
    for step in range(scale.teacher_steps):
        take = order[(np.arange(scale.teacher_batch) + step * scale.teacher_batch) % len(order)]
        x = torch.from_numpy(blocks[take]).to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr.step()
        if step % 50 == 0 or step == scale.teacher_steps - 1:
            say(f"teacher step {step + 1}/{scale.teacher_steps} loss {loss.item():.3f} ({time.time() - started:.0f} s)")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


# -- stores ------------------------------------------------------------------------------------------
def make_stores(workdir: str, transfer: np.ndarray, tokenizer: Any, scale: Scale, device: str,
                names: list[str], codec: str = "packed", teacher: str | None = None) -> dict[str, str]:
    """One store per name; `codec` is the codec of the sampled and hybrid stores (the draws are the
    same in both: the compact codec is lossless), top-K stores stay unpacked. `teacher`: a
    save_pretrained folder (default: the work folder's trained teacher)."""
    from potstill.teacher_gen.config import GenerateConfig
    from potstill.teacher_gen.runner import generate

    prompts = os.path.join(workdir, "transfer.jsonl")
    with open(prompts, "w", encoding="utf-8") as f:
        for i, text in enumerate(tokenizer.batch_decode(transfer.tolist())):
            f.write(json.dumps({"id": f"b{i:06d}", "prompt": text}) + "\n")
    urls = {}
    for name in names:
        settings = STORES[name]
        if settings["targets"] != "topk":
            settings = {**settings, "codec": codec}
        suffix = f".{settings['codec']}" if settings.get("codec") == "compact" else ""
        url = os.path.join(workdir, "stores", f"{name}{suffix}.store")
        config = GenerateConfig.build(
            teacher=teacher or os.path.join(workdir, "teacher"), prompts=prompts, store=url, score_prompt=True,
            max_length=scale.seq, truncate=True, device=device, progress=False, writer_threads=1,
            shard_records=1 << 20, batch_tokens=scale.seq * 32, seed=7, **settings,
        )
        summary = generate(config)
        say(f"store {name}: {summary.records} records written, {summary.already_done} already there")
        urls[name] = url
    orders = {name: open_store(u).id_index().ids().to_pylist() for name, u in urls.items()}
    first = next(iter(orders.values()))
    assert all(o == first for o in orders.values()), "stores hold their records in different orders"
    return urls


def store_bytes(url: str) -> dict[str, float]:
    store = open_store(url)
    info = store_info(store)
    out = {"target_bytes_per_token": info["target_bytes_per_scored_token"], "bytes_per_token": info["bytes_per_token"],
           "codec": store.manifest.targets.codec}
    if store.manifest.targets.has_sampled:
        entries = positions = 0
        for rec in store.iter_records():
            entries += rec.sampled.num_entries
            positions += rec.sampled.num_positions
        out["unique_ids_per_position"] = entries / positions
    return out


# -- students ----------------------------------------------------------------------------------------
def objective_for(variant: str) -> Objective:
    if variant in ("ce", "full"):  # their store gives the tokens only: CE (alpha = 1), or online KD
        return Objective(alpha=1.0 if variant == "ce" else 0.0, targets=objective_for(store_for(variant)).targets)
    if STORES.get(variant, {}).get("targets") in ("sampled", "hybrid"):
        return Objective(targets="sampled")  # hybrid stores: top-K exactly, draws from the rest, unbiased
    return Objective(tail=not variant.endswith("-notail"))


def store_for(variant: str) -> str:
    return "sampled12" if variant in ("ce", "full") else variant.removesuffix("-notail")


def online_kd(model: DistillModel, teacher: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Full-vocabulary forward KL(teacher ‖ student) at every trained position, the teacher run now."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pos_batch=batch["pos_batch"], pos_index=batch["pos_index"])
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_log = torch.log_softmax(t_logits[batch["pos_batch"], batch["pos_index"]].float(), -1)
    s_log = torch.log_softmax(out["logits"].float(), -1)
    kl = (t_log.exp() * (t_log - s_log)).sum(-1)
    return masked_mean(kl, batch["has_kd"])


def student_optimizer(model: torch.nn.Module, head: torch.nn.Parameter, scale: Scale) -> torch.optim.AdamW:
    """The students' AdamW over `model`'s parameters: `scale.student_lr`, with the output layer's weight
    (`head`) in a group of its own at `student_head_lr` times that, β₂ `student_head_beta2` and weight
    decay `student_head_wd`."""
    head_beta2 = scale.student_beta2 if scale.student_head_beta2 is None else scale.student_head_beta2
    groups = [{"params": [p for p in model.parameters() if p is not head]},
              {"params": [head], "lr": scale.student_lr * scale.student_head_lr, "betas": (0.9, head_beta2),
               "weight_decay": scale.student_head_wd}]
    return torch.optim.AdamW(groups, lr=scale.student_lr, weight_decay=scale.student_wd, betas=(0.9, scale.student_beta2))


def train_student(variant: str, init: dict[str, torch.Tensor], stores: dict[str, str], teacher: Any, scale: Scale,
                  seed: int, device: str, heldout: np.ndarray) -> tuple[Any, dict[int, float], np.ndarray]:
    """The student after `scale.student_steps` steps, its held-out CE at `scale.eval_steps` on the way,
    and the RMS of each output-layer row's AdamW second moment at the end (noise there slows the row's
    steps).
    `teacher`: a model, or a `CachedTeacher` (anything whose call gives `.logits`)."""
    student = llama(scale.vocab, scale.student_hidden, scale.student_layers, scale.seq, seed=0)
    student.load_state_dict(init)
    model = DistillModel(student).to(device).train()
    objective = objective_for(variant)
    data = StoreDataset.open(stores[store_for(variant)], batch_size=scale.student_batch, seed=seed, shuffle_buffer=4096,
                             eval_fraction=0.0, num_workers=0, student_vocab=scale.vocab, pad_id=0,
                             targets=objective.targets)
    batches = data.batches(0)
    head = student.get_output_embeddings().weight
    optimizer = student_optimizer(model, head, scale)
    lr = schedule(optimizer, scale.student_steps, max(1, scale.student_steps // 20), scale.student_final_lr)
    started = time.time()
    curve: dict[int, float] = {}
    for step in range(scale.student_steps):
        if step in scale.eval_steps:
            curve[step] = heldout_ce(student, heldout, device)
            model.train()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(batches).items()}
        if variant == "full":
            loss = online_kd(model, teacher, batch)
        else:
            loss, _ = distill_loss(model, batch, objective)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr.step()
    say(f"student {variant} seed {seed}: {scale.student_steps} steps in {time.time() - started:.0f} s, last loss {loss.item():.3f}")
    return student.eval(), curve, optimizer.state[head]["exp_avg_sq"].mean(1).sqrt().cpu().numpy()


def train_students(variants: list[str], stores: dict[str, str], teacher: Any, scale: Scale, seeds: range, device: str,
                   heldout: np.ndarray, after: Callable[[str, Any, dict, dict], None] | None = None,
                   bands: np.ndarray | None = None
                   ) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[dict[int, float]]]]:
    """(results, curves): every variant's student for every seed, each seed's students from the same
    initial weights, evaluated on `heldout` against `teacher` (by frequency band too, given `bands`).
    `after(variant, student, results, curves)` runs after each student (the gradient variance, the
    partial JSON)."""
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    curves: dict[str, list[dict[int, float]]] = {v: [] for v in variants}
    for seed in seeds:
        init = llama(scale.vocab, scale.student_hidden, scale.student_layers, scale.seq, seed=100 + seed).state_dict()
        for variant in variants:
            student, curve, head_rms = train_student(variant, init, stores, teacher, scale, seed, device, heldout)
            results[variant].append(evaluate(student, teacher, heldout, device, bands=bands, head_rms=head_rms))
            curves[variant].append(curve | {scale.student_steps: results[variant][-1]["ce"]})
            say(f"  {variant} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[variant][-1].items()))
            if after:
                after(variant, student, results, curves)
    return results, curves


def curves_json(curves: dict[str, list[dict[int, float]]]) -> dict[str, list[dict[str, float]]]:
    return {v: [{str(k): x for k, x in c.items()} for c in cs] for v, cs in curves.items()}


def curves_from_json(curves: dict[str, list[dict[str, float]]]) -> dict[str, list[dict[int, float]]]:
    return {v: [{int(k): x for k, x in c.items()} for c in cs] for v, cs in curves.items()}


@torch.no_grad()
def heldout_ce(student: Any, heldout: np.ndarray, device: str) -> float:
    """The student's held-out cross-entropy (all `evaluate` needs for the share of full KD's gain)."""
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    for start in range(0, len(heldout), 32):
        x = torch.from_numpy(heldout[start : start + 32]).to(device)
        s_log = torch.log_softmax(student(input_ids=x).logits[:, :-1].float(), -1)
        total += -s_log.gather(-1, x[:, 1:, None]).sum().item()
        count += x[:, 1:].numel()
    student.train(was_training)
    return total / count


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(student: Any, teacher: Any, heldout: np.ndarray, device: str, bins: int = 15,
             bands: np.ndarray | None = None, head_rms: np.ndarray | None = None) -> dict[str, float]:
    """Held-out CE, full KL(teacher ‖ student), ECE (top-1, equal-width bins), the signed calibration gap
    (mean top-1 probability − accuracy: > 0 is over-confident) and top-1 agreement. Given each id's
    frequency band (`frequency_bands`): the KL's terms summed per band of the id (`kl_band<b>`), the
    student's probability mass on the band's ids minus the teacher's (`mass_band<b>`), both per position,
    and, given the RMS of each output-layer row's AdamW second moment (`train_student`), its median over
    the band's rows (`head_rms_band<b>`)."""
    ce = kl = agree = 0.0
    count = 0
    n_bands = len(FREQUENCY_BANDS) + 1
    kl_bands, mass_bands = np.zeros(n_bands), np.zeros(n_bands)
    conf_sum, acc_sum = np.zeros(bins), np.zeros(bins)
    for start in range(0, len(heldout), 32):
        x = torch.from_numpy(heldout[start : start + 32]).to(device)
        s_log = torch.log_softmax(student(input_ids=x).logits[:, :-1].float(), -1)
        t_log = torch.log_softmax(teacher(input_ids=x).logits[:, :-1].float(), -1)
        target = x[:, 1:]
        ce += -s_log.gather(-1, target[..., None]).sum().item()
        t_prob = t_log.exp()
        terms = t_prob * (t_log - s_log)
        kl += terms.sum().item()
        if bands is not None:  # each id's terms over the batch's positions, then summed per band
            per_id = terms.reshape(-1, terms.shape[-1]).sum(0).double().cpu().numpy()
            kl_bands += np.bincount(bands, weights=per_id, minlength=n_bands)
            excess = (s_log.exp() - t_prob).reshape(-1, terms.shape[-1]).sum(0).double().cpu().numpy()
            mass_bands += np.bincount(bands, weights=excess, minlength=n_bands)
        conf, pred = s_log.max(-1)
        agree += (pred == t_log.argmax(-1)).sum().item()
        conf = conf.exp().flatten().cpu().numpy()
        correct = (pred == target).flatten().cpu().numpy()
        which = np.minimum((conf * bins).astype(int), bins - 1)
        np.add.at(conf_sum, which, conf)
        np.add.at(acc_sum, which, correct)
        count += target.numel()
    ece = float(np.abs(acc_sum - conf_sum).sum() / count)  # Σ_b (n_b / n) |acc_b − conf_b|
    out = {"ce": ce / count, "kl": kl / count, "ece": ece, "top1": agree / count, "tokens": count,
           "overconfidence": float((conf_sum.sum() - acc_sum.sum()) / count)}
    if bands is not None:
        out |= {f"kl_band{b}": float(kl_bands[b] / count) for b in range(n_bands)}
        out |= {f"mass_band{b}": float(mass_bands[b] / count) for b in range(n_bands)}
        if head_rms is not None:
            out |= {f"head_rms_band{b}": float(np.median(head_rms[bands == b])) for b in range(n_bands)}
    return out


@contextlib.contextmanager
def figure(folder: str, name: str) -> Iterator[Any]:
    """The axes of a new figure; on leaving the block: legend, saved as folder/name, closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        yield ax
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=110)
    finally:
        plt.close(fig)


def pm(values: list[float], scale: float = 1.0, fmt: str = ".1f") -> str:
    a = np.asarray(values) * scale
    # a signed format ("+.4f") signs the mean only
    return f"{a.mean():{fmt}} ± {a.std(ddof=1):{fmt.lstrip('+')}}" if len(a) > 1 else f"{a.mean():{fmt}}"


def read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# -- a run ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run of the bench, as its command line set it up."""

    args: argparse.Namespace
    scale: Scale
    scale_name: str
    variants: list[str]
    workdir: str
    settings: dict[str, Any]  # what the work folder's tokenizer, teacher and stores depend on
    started: float = dataclasses.field(default_factory=time.time)

    def keep_workdir(self) -> None:
        """Record the settings the work folder was made with: a later run with the same ones reuses it."""
        with open(os.path.join(self.workdir, "settings.json"), "w") as f:
            json.dump(self.settings, f)

    def minutes(self) -> float:
        return (time.time() - self.started) / 60


def load_corpus(corpus: str, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """The train and held-out texts of the corpus (split by a hash of each file's path)."""
    files = corpus_files(corpus)
    train_files = [f for f in files if not is_heldout(f, corpus, heldout_fraction)]
    held_files = [f for f in files if is_heldout(f, corpus, heldout_fraction)]
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    say(f"corpus {corpus}: {len(train_files)} train files ({sum(map(len, train_texts)) / 1e6:.1f} MB), "
        f"{len(held_files)} held-out files")
    return train_texts, held_texts
