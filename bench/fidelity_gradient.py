"""Fidelity bench, gradient error: on the full-KD student, E‖g − g*‖² / ‖g*‖² of each sampled kind's
parameter gradient g on held-out blocks against full KD's exact gradient g*."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from fidelity_common import STORES, pm

GRAD_BLOCKS, GRAD_REPEATS = 4, 6  # gradient variance: held-out blocks, target draws per variant


def target_weights(variant: str, teacher: Any, x: torch.Tensor, repeat: int) -> torch.Tensor:
    """Dense [P, V] target weights of one draw of `variant`'s targets at every next-token position of
    blocks `x`, made by the capture code itself (`teacher_gen.capture.topk_logprobs`, the sampler and
    its uniforms as `potstill generate` makes them, seeded by `repeat`) and weighted as the loader does."""
    from potstill.store.codec import sampled_from_draws
    from potstill.student_train.data import hybrid_weights
    from potstill.teacher_gen.capture import topk_logprobs

    settings = STORES[variant]
    with torch.no_grad():
        hidden = teacher.model(input_ids=x).last_hidden_state[:, :-1].reshape(-1, teacher.config.hidden_size)
        targets = x[:, 1:].reshape(-1)
        n, k = settings["samples"], settings.get("top_k", 0) if settings["targets"] == "hybrid" else 0
        uniforms = torch.from_numpy(np.random.default_rng([repeat, 12345]).random((len(targets), n)))
        draws = torch.empty(uniforms.shape, dtype=torch.int32)
        ids, lp, _, tail = topk_logprobs(hidden, teacher.lm_head, targets, k, uniforms=uniforms, draws_out=draws,
                                         sampler=settings.get("sampler", "iid"),
                                         draw_from_rest=settings["targets"] == "hybrid")
    sampled = sampled_from_draws(draws.numpy())
    rows = np.arange(len(targets))
    if k:
        w_ids, w = hybrid_weights(ids.numpy(), lp.float().numpy(), tail.numpy(), sampled, rows)
    else:
        w_ids, counts = sampled.padded(rows)
        w = (counts / n).astype(np.float32)
    dense = torch.zeros(len(targets), teacher.config.vocab_size, dtype=torch.float32)
    valid = w_ids >= 0
    dense.index_put_((torch.from_numpy(np.nonzero(valid)[0]), torch.from_numpy(w_ids[valid])),
                     torch.from_numpy(w[valid]), accumulate=True)
    return dense


def gradient_variance(student: Any, teacher: Any, heldout: np.ndarray, variants: list[str], device: str
                      ) -> dict[str, float]:
    """E‖g − g*‖² / ‖g*‖² over GRAD_REPEATS target draws, per variant: g the gradient of the variant's
    loss on GRAD_BLOCKS held-out blocks with respect to every student parameter, g* full KD's exact
    gradient there (forward KL against the teacher's full distribution). CE: its one (biased) gradient."""
    x = torch.from_numpy(heldout[:GRAD_BLOCKS]).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    with torch.no_grad():
        p_teacher = torch.softmax(teacher(input_ids=x).logits[:, :-1].float(), -1).reshape(-1, teacher.config.vocab_size)

    def grad(weights: torch.Tensor) -> torch.Tensor:
        s_log = torch.log_softmax(student(input_ids=x).logits[:, :-1].float(), -1).reshape(weights.shape)
        loss = -(weights * s_log).sum() / len(weights)  # cross-entropy form: the same gradient as the KL
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    was_training = student.training
    student.eval()  # no dropout: the only randomness is the targets'
    exact = grad(p_teacher)
    norm = exact.square().sum().item()
    out = {"ce": (grad(torch.nn.functional.one_hot(x[:, 1:].reshape(-1), p_teacher.shape[1]).float()) - exact)
           .square().sum().item() / norm}
    for variant in variants:
        errors = [(grad(target_weights(variant, teacher, x, r)) - exact).square().sum().item() for r in range(GRAD_REPEATS)]
        out[variant] = float(np.mean(errors)) / norm
    student.train(was_training)
    return out


def grad_table(grad_var: dict[str, list[dict[str, float]]], seeds: int) -> str:
    names = list(grad_var["full-KD student"][0].keys())
    lines = ["| target | " + " | ".join(f"E‖g − g*‖² / ‖g*‖², {k}" for k in grad_var) + " |", "|---|" + "---:|" * len(grad_var)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(pm([r[name] for r in runs], 1, ".4g") for runs in grad_var.values()) + " |")
    return "\n".join(lines)
