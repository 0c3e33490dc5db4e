"""The training objective: one function from a collated batch to the total loss and its parts.
Used by the Trainer's `compute_loss` and by bench/train_step.py, so both time the same step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from potstill.student_train import losses
from potstill.student_train.config import TrainConfig
from potstill.student_train.data import MAIN_TASK, RATIONALE_TASK


@dataclass(frozen=True)
class Objective:
    """Which losses, with which weights (the loss-related part of TrainConfig)."""

    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.0
    tail: bool = True
    hidden_pairs: tuple[tuple[int, int], ...] = ()
    hidden_loss: str = "standardized_mse"
    hidden_weight: float = 1.0
    relation_weight: float = 0.0
    multitask: bool = False
    rationale_weight: float = 1.0
    targets: str = "topk"  # which stored targets the KD term uses: topk or sampled (resolved from "auto")

    @classmethod
    def from_config(cls, config: TrainConfig) -> Objective:
        return cls(
            loss=config.loss,
            temperature=config.kd_temperature,
            beta=config.beta,
            alpha=config.alpha,
            tail=config.tail,
            hidden_pairs=tuple(config.hidden_pairs()),
            hidden_loss=config.hidden_loss,
            hidden_weight=config.hidden_weight,
            relation_weight=config.relation_weight,
            multitask=config.rationale_mode == "multitask",
            rationale_weight=config.rationale_weight,
            targets=config.targets if config.targets != "auto" else "topk",
        )

    @property
    def needs_hidden(self) -> bool:
        return bool(self.hidden_pairs) and (self.hidden_weight > 0 or self.relation_weight > 0)

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        """Stored teacher layers the loader must read (none unless a hidden or relation loss is on)."""
        return tuple(sorted({t for _, t in self.hidden_pairs})) if self.needs_hidden else ()


def topk_kd(logits: torch.Tensor, batch: dict[str, Any], objective: Objective, lse: torch.Tensor) -> torch.Tensor:
    """KD on top-k targets: the chosen divergence on the K + 1 buckets (`losses.sparse_kd`)."""
    return losses.sparse_kd(logits, batch["topk_ids"], batch["topk_logprobs"], batch["tail_logprob"], loss=objective.loss,
                            temperature=objective.temperature, beta=objective.beta, tail=objective.tail)


def weighted_kd(logits: torch.Tensor, batch: dict[str, Any], objective: Objective, lse: torch.Tensor) -> torch.Tensor:
    """KD on weighted ids (sampled or hybrid targets): forward KL at T = 1, the only loss linear in
    the teacher's distribution (checked when the run starts; `losses.sampled_kd`)."""
    return losses.sampled_kd(logits, batch["sampled_ids"], batch["sampled_probs"], lse=lse)


def cross_kd(logits: torch.Tensor, batch: dict[str, Any], objective: Objective, lse: torch.Tensor) -> torch.Tensor:
    """KD across tokenizers (student_train/cross_tokenizer.py): at positions whose token matches a
    teacher token's span (`matched`), the chosen divergence on the exact target carried into the
    student's vocabulary; at a token covering several whole teacher tokens (a chunk), the two-bucket KL
    on the teacher's probability of its text (`losses.chunk_kl`); elsewhere ULD on the teacher's stored
    row (`losses.uld`)."""
    exact = topk_kd(logits, batch, objective, lse)
    chunk = batch["chunk_logprob"] > losses.EMPTY
    chain = losses.chunk_kl(logits, batch["hard_ids"], batch["chunk_logprob"], lse)
    sorted_distance = losses.uld(logits, batch["uld_logprobs"], batch["uld_tail"], lse)
    return torch.where(batch["matched"], exact, torch.where(chunk, chain, sorted_distance))


# The KD loss per position of each loader shape (`store.targets.TRAIN_TARGETS`; "cross": --cross-tokenizer).
KD_LOSSES = {"topk": topk_kd, "sampled": weighted_kd, "cross": cross_kd}


def distill_loss(
    model: Any, batch: dict[str, Any], objective: Objective, terms: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of one micro-batch and its detached parts (for logging).

    total = L_main + λ_rationale · L_rationale + w_hidden · L_hidden + w_relation · L_relation, where
    L_task is the mean over that task's positions of α·CE + (1 − α)·KD (CE alone where a position has
    no teacher target). In plain mode every position belongs to the main task.

    `terms`, when given, is filled with the additive terms of the total, each with its weight and
    still attached to the graph (their sum is the total): `kd` = the (1 − α)·KD parts of the tasks,
    `ce` = their CE parts, `hidden` = w_hidden · L_hidden, `relation` = w_relation · L_relation. The
    trainer takes the gradient of each to log its share (`grad_share/…`).
    """
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pos_batch=batch["pos_batch"],
        pos_index=batch["pos_index"],
        with_hidden=objective.needs_hidden,
    )
    logits = out["logits"].float()
    lse = torch.logsumexp(logits, dim=-1)
    kd = KD_LOSSES[objective.targets](logits, batch, objective, lse)
    ce = losses.token_cross_entropy(logits, batch["hard_ids"], lse)
    has_kd, task = batch["has_kd"], batch["task"]
    per_position = losses.mix_ce_kd(ce, kd, has_kd, objective.alpha)
    total = losses.masked_mean(per_position, task == MAIN_TASK)
    parts = {"kd": losses.masked_mean(kd, has_kd), "ce": losses.masked_mean(ce, torch.ones_like(has_kd))}
    if terms is not None:  # the KD and CE shares of per_position, weighted as the tasks are in the total
        kd_part = torch.where(has_kd, (1 - objective.alpha) * kd, torch.zeros_like(kd))
        weights = [(MAIN_TASK, 1.0)] + ([(RATIONALE_TASK, objective.rationale_weight)] if objective.multitask else [])
        terms["kd"] = sum(w * losses.masked_mean(kd_part, task == t) for t, w in weights)
        terms["ce"] = sum(w * losses.masked_mean(per_position - kd_part, task == t) for t, w in weights)
    if objective.multitask:
        rationale = losses.masked_mean(per_position, task == RATIONALE_TASK)
        parts["answer_task"], parts["rationale_task"] = total, rationale
        total = total + objective.rationale_weight * rationale
        if "multitask_fallback" in batch:  # the share of this batch's records used whole
            parts["multitask_fallback"] = batch["multitask_fallback"].float()
    if objective.needs_hidden:
        mask = batch["hidden_mask"]
        hidden_terms, relation_terms = [], []
        for s, t in objective.hidden_pairs:
            teacher = batch[f"teacher_hidden_{t}"].float()
            if objective.hidden_weight > 0:  # per position on the padded [B, T] grid: no host sync
                per_position = losses.HIDDEN_LOSSES[objective.hidden_loss](out["projected"][(s, t)].float(), teacher)
                hidden_terms.append(losses.masked_mean(per_position, mask))
            if objective.relation_weight > 0:
                relation_terms.append(losses.relation_loss(out["hidden"][s].float(), teacher, mask))
        if hidden_terms:
            parts["hidden"] = torch.stack(hidden_terms).mean()
            total = total + objective.hidden_weight * parts["hidden"]
            if terms is not None:
                terms["hidden"] = objective.hidden_weight * parts["hidden"]
        if relation_terms:
            parts["relation"] = torch.stack(relation_terms).mean()
            total = total + objective.relation_weight * parts["relation"]
            if terms is not None:
                terms["relation"] = objective.relation_weight * parts["relation"]
    return total, {name: value.detach() for name, value in parts.items()}
