"""`evaluate(store, model_dir)`: how close a student is to the stored teacher, on held-out records.

Held-out = the records whose sha256(id) falls below the eval fraction, raised to hold out at least
8 records when the store has 32 or more (`data.eval_cut`): the records the training loader never
yields. Metrics, averaged over every scored position:

- `kd_loss`: forward KL(teacher ‖ student) on the K + 1 buckets (top-K plus tail), T = 1, whenever
  the store holds top-k targets (`kd_target` "topk"). A store of sampled targets only
  (`kd_target` "sampled") reports KL(p̂ ‖ student) against the N-draw estimate p̂ = counts / N, the
  sampled training loss: the full KL plus a constant that depends on the teacher and N only, so
  differences between students are unbiased estimates of differences in full KL, but the level is
  not the full KL's;
- `top1_agreement`: how often the student's argmax is the teacher's most likely token (sampled
  only: the most frequent of the N draws, a noisy estimate of it);
- `perplexity`: exp(mean cross-entropy) of the student on the stored tokens (the teacher's);
- `answer_accuracy` (when records hold answers): greedy-generate from each record's prompt
  (the tokens before score_start), extract the answer with the store's `generation.answer_pattern`
  and `generation.answer_match` (last or first match), or generation's defaults ("The answer is X" /
  "#### X"; last match), compare normalised with `answer`.

Several stores (teachers over the same prompts, student_train/teachers.py): `kd_loss` and
`top1_agreement` against their weighted mixture on the held-out records every store holds, and in
`teachers`, per store with its weight, the same metrics against that teacher alone on those records.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from potstill.store import Store, StoreError, open_store
from potstill.student_train import losses
from potstill.student_train.config import TrainConfig
from potstill.student_train.data import (
    TEACHER_IDS,
    LoaderPlan,
    Sequence,
    collate,
    held_out_note,
    held_out_rows,
    plan_split,
    record_sequence,
)
from potstill.student_train.errors import TrainError
from potstill.student_train.model import check_tokenizer, check_vocab, load_tokenizer
from potstill.student_train.objective import KD_LOSSES, Objective
from potstill.student_train.teachers import Teachers, order_stores

# The default of `potstill generate` (teacher_gen/rationale.py), for stores that do not record theirs:
# "The answer is X" / "The final answer is X" / "Final Answer: X" / "#### X", to the end of its
# sentence, never the template's placeholder X itself.
# KD is measured at T = 1 with forward KL on the K + 1 buckets, whatever the run trained with.
EVAL_OBJECTIVE = Objective()
DEFAULT_ANSWER_PATTERN = (
    r"(?:[Tt]he (?:final )?answer is|[Ff]inal [Aa]nswer:|####)(?![ \t]*:?[ \t]*[\"'*]*X\b)[ \t]*:?[ \t]*"
    r"(?P<answer>[^\n]*?)(?=[.,;!?]?[ \t]*(?:\n|$)|[.,;!?][ \t])"
)


def extract_answer(text: str, pattern: str = DEFAULT_ANSWER_PATTERN, match: str = "last") -> str | None:
    """The answer in a completion, as generation extracts it: the last (or first) match, overlaps
    allowed, its `answer` group (else its first group, else the whole match), without spaces, final
    period, bold."""
    regex = re.compile(pattern)
    last, pos = None, 0
    while (found := regex.search(text, pos)) is not None:
        last, pos = found, found.start() + 1
        if match == "first":
            break
    if last is None:
        return None
    if "answer" in regex.groupindex:
        answer = last.group("answer")
    else:
        answer = last.group(1) if regex.groups else last.group(0)
    return (answer or "").strip().rstrip(".").strip().strip("*").strip().rstrip(".").strip() or None


def normalise_answer(answer: str) -> str:
    """Compare answers loosely: case, surrounding space, a final period, thousands commas and $ ignored."""
    return re.sub(r"[\s,$]", "", answer).rstrip(".").casefold()


def _eval_fraction_of(model_dir: str | None) -> float:
    """The fraction the model was trained with (its training report), else the default."""
    path = os.path.join(model_dir or "", "training_report.json")
    if model_dir and os.path.isfile(path):
        try:
            with open(path) as f:
                return float(json.load(f)["settings"]["eval_fraction"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return TrainConfig.eval_fraction


@torch.no_grad()
def evaluate(
    store: str | list[str] | Store,
    model_dir: str | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    eval_fraction: float | None = None,
    max_records: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    answers: bool = True,
    device: str | None = None,
    plan: LoaderPlan | None = None,
    skip_shards: Iterable[str] = (),
    skip_bad_shards: bool = False,
    teachers: Teachers | None = None,
    teacher_weights: list[float] | None = None,
) -> dict[str, Any]:
    """Evaluate a student folder (or an in-memory `model` + `tokenizer`) on the held-out records: those of
    `plan` when given (a training run's own split, so that nothing is recomputed), else the store's at
    `eval_fraction` (default: the fraction the model's training report names). The held-out records of
    `skip_shards` (shards a --skip-bad-shards run left out) are not read, and with `skip_bad_shards`
    neither are those of a shard that fails its checks here: the result names such shards and how many
    held-out records that removed."""
    from transformers import AutoModelForCausalLM

    # Every file read is checked against its commit record's sha256 first, and its values (as in training).
    if isinstance(store, list) and len(store) > 1:  # several teachers: against their mixture, on the held-out
        # records every store holds (the first store's split; student_train/teachers.py)
        urls, weights = order_stores(store, teacher_weights or [1 / len(store)] * len(store), "")
        stores = [open_store(url, verify_reads=True) for url in urls]
        fraction = _eval_fraction_of(model_dir) if eval_fraction is None else eval_fraction
        teachers, plan = Teachers.open(stores[0], plan_split(stores[0], fraction, 1, 0), stores[1:], weights[1:])
        store = stores[0]
    elif isinstance(store, list):
        store = store[0]
    store = open_store(store, verify_reads=True) if isinstance(store, str) else store
    if model is None:
        if not model_dir or not os.path.isdir(model_dir):
            raise TrainError(f"model folder {model_dir} does not exist")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if device:
            model.to(device)
    if tokenizer is None:
        tokenizer, source = load_tokenizer(model_dir or "", store)
        check_tokenizer(tokenizer, store, source)
    vocab = check_vocab(model, store)
    if plan is not None:
        fraction, rows = plan.eval_fraction, list(plan.held_out)
        note = held_out_note(plan.num_train + plan.eval_records, plan.eval_records, fraction)
    else:
        fraction = _eval_fraction_of(model_dir) if eval_fraction is None else eval_fraction
        rows = held_out_rows(store, fraction)
        note = held_out_note(store.num_records - store.num_duplicates, len(rows), fraction)  # distinct ids
    if max_records:
        rows = rows[:max_records]
    skipped = set(skip_shards)
    if skip_bad_shards:
        skipped |= _failing_shards(store, {name for name, _ in rows} - skipped)
    held = len(rows)
    rows = [(name, row) for name, row in rows if name not in skipped]
    result: dict[str, Any] = {"store": store.url, "model": model_dir, "eval_fraction": fraction, "records": len(rows)}
    if teachers:
        result["teachers"] = teachers.describe(store.url)
    if note:  # empty, or below the floor: say why
        result["note"] = note
    if skipped:
        result.update(skipped_shards=sorted(skipped), records_left_out=held - len(rows))
    if not rows:
        result.update(scored_tokens=0, kd_loss=None, top1_agreement=None, perplexity=None, answer_accuracy=None)
        return result

    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stores = [store, *(teachers.stores if teachers else [])]
    offered = set.intersection(*(set(s.manifest.targets.target_kind.train_targets) for s in stores))
    target = "topk" if "topk" in offered else "sampled"  # measured against the top-k where the stores have them

    def mixed(name: str, row: int) -> Sequence:
        seq = record_sequence(store.shard(name), row, target)
        return teachers.sequence(seq, name, row, target) if teachers else seq  # several stores: their mixture

    width = teachers.width if teachers else store.manifest.targets.k
    result.update(kd_target=target, **_kd_metrics(model, rows, mixed, width, pad_id, vocab, target, batch_size))
    if teachers:  # the student against each teacher alone, on that teacher's own tokens of the same records
        for i, entry in enumerate(result["teachers"]):
            def alone(name: str, row: int, i: int = i) -> Sequence:
                return teachers.own_sequence(i, store, name, row, target)

            k = stores[i].manifest.targets.k
            entry.update(_kd_metrics(model, rows, alone, k, pad_id, vocab, target, batch_size))
    result.update(_answer_accuracy(store, rows, model, tokenizer, max_new_tokens) if answers else {})
    model.train(was_training)
    return result


def _kd_metrics(model: Any, rows: list[tuple[str, int]], sequence: Callable[[str, int], Sequence], width: int,
                pad_id: int, vocab: int, target: str, batch_size: int = 8) -> dict[str, Any]:
    """kd_loss, top1_agreement and perplexity of `model` over the records `rows`, each read by `sequence`."""
    dev = next(model.parameters()).device
    kd_sum = top1_sum = ce_sum = 0.0
    tokens = 0
    for start in range(0, len(rows), batch_size):
        seqs = [sequence(name, row) for name, row in rows[start : start + batch_size]]
        batch = collate(seqs, k=width, pad_id=pad_id, student_vocab=vocab, targets=target)
        batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits = logits[batch["pos_batch"], batch["pos_index"]].float()
        lse = torch.logsumexp(logits, dim=-1)
        kd = KD_LOSSES[target](logits, batch, EVAL_OBJECTIVE, lse)
        teacher_top1 = batch[TEACHER_IDS[target]][:, 0]  # top-k: the most likely id; draws: the most frequent
        ce = losses.token_cross_entropy(logits, batch["hard_ids"], lse)
        kd_sum += kd.sum().item()
        ce_sum += ce.sum().item()
        top1_sum += (logits.argmax(-1) == teacher_top1).sum().item()
        tokens += len(kd)
    return {
        "scored_tokens": tokens,
        "kd_loss": kd_sum / tokens if tokens else None,
        "top1_agreement": top1_sum / tokens if tokens else None,
        "perplexity": math.exp(ce_sum / tokens) if tokens else None,
    }


def _failing_shards(store: Store, names: set[str]) -> set[str]:
    """The shards among `names` whose files or values fail the store's checks (read once each here, so
    that the evaluation loop never meets one halfway through a batch)."""
    failing = set()
    for name in sorted(names):
        try:
            store.shard(name)  # opening a shard runs its file and value checks
        except StoreError:
            failing.add(name)
    return failing


def _answer_accuracy(store: Store, rows: list[tuple[str, int]], model: Any, tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    pattern = store.manifest.generation.get("answer_pattern")
    pattern = pattern if isinstance(pattern, str) and pattern else DEFAULT_ANSWER_PATTERN
    match = "first" if store.manifest.generation.get("answer_match") == "first" else "last"
    dev = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    checked = correct = 0
    for name, row in rows:
        views = store.shard(name).views
        expected = views.text_of("answer", row)
        if expected is None:
            continue
        prompt = torch.tensor(views.input_ids_of(row)[: int(views.score_start[row])], dtype=torch.long, device=dev)
        generated = model.generate(
            input_ids=prompt.unsqueeze(0),
            attention_mask=torch.ones_like(prompt).unsqueeze(0),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        text = tokenizer.decode(generated[0, len(prompt) :].tolist(), skip_special_tokens=True)
        found = extract_answer(text, pattern, match)
        checked += 1
        correct += int(found is not None and normalise_answer(found) == normalise_answer(expected))
    if not checked:
        return {"answer_accuracy": None, "answers_checked": 0}
    return {"answer_accuracy": correct / checked, "answers_checked": checked, "answers_correct": correct}
