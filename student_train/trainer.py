"""`train(config)`: a `transformers.Trainer` subclass streaming a store into a student.

`train` is a recipe of small steps: `open_run` (settings, rank, the store opened once, the resume
point, the split and order planned once), `load_student_for` (the student and its checks against the
store), `Run.dataset` (this rank's loader over that store and plan), `make_trainer`,
`train_or_resume`, and `finish` (save, final evaluation on the plan's held-out records, report).

Mixed precision, gradient accumulation, checkpoints, resume, DDP/FSDP (torchrun / accelerate launch)
and tensorboard all come from Trainer and accelerate. What is added here: the loss
(`compute_loss` → `objective.distill_loss`), the store loader (its own DataLoader: the dataset
already splits work across ranks, so accelerate must not shard or dispatch it), the loader state in
every checkpoint (`SaveLoaderState`), and saving the student with `save_pretrained` instead of the
wrapper's state dict.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from potstill.phases import Phases
from potstill.store import Store, open_store, potstill_version
from potstill.store.fs import write_problem
from potstill.student_train.config import TrainConfig, resolve_hidden_pairs
from potstill.student_train.cross_tokenizer import (
    CrossTokenizer,
    CrossTokenizerDataset,
    check_cross_settings,
    evaluate_cross,
    student_fingerprint,
)
from potstill.student_train.data import (
    LoaderPlan,
    StoreDataset,
    check_targets,
    end_job_checks,
    job_checks_folder,
    plan_split,
)
from potstill.student_train.errors import ConfigError, TrainError
from potstill.student_train.model import (
    DistillModel,
    check_head,
    check_hidden_map,
    check_tokenizer,
    check_vocab,
    check_weights,
    load_student,
    load_tokenizer,
)
from potstill.student_train.objective import Objective, distill_loss
from potstill.student_train.plots import LOSS_CURVE_FILE, write_loss_curve
from potstill.student_train.teachers import MixedDataset, Teachers, order_stores, resolve_targets

REPORT_FILE = "training_report.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def loader_state_file(rank: int) -> str:
    return f"loader_state_rank{rank}.json"


class DistillTrainer(Trainer):
    """Trainer with the distillation loss, the store loader and its resumable state."""

    def __init__(self, *args: Any, objective: Objective, tokenizer_to_save: Any = None, head_lr_scale: float = 1.0,
                 **kwargs: Any) -> None:
        self.head_lr_scale = head_lr_scale  # read by create_optimizer
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.tokenizer_to_save = tokenizer_to_save
        self.batches_consumed = 0  # micro-batches this rank has trained on (its loader position)
        self.skipped_shards: dict[str, str] = {}  # shards left out (--skip-bad-shards), with why
        self._part_sums: dict[str, torch.Tensor] = {}
        self._part_batches: dict[str, int] = {}  # of each part: the micro-batches that gave it
        self._step_records: list[str] = []  # records of the micro-batches of the current optimizer step
        self._step_losses: list[torch.Tensor] = []
        self._grad_share: dict[str, torch.Tensor] = {}  # of the step about to be logged (`_measure_grad_share`)
        self._share_step = -1  # the optimizer step whose grad share is measured
        self._share_off = False  # set when the model cannot give per-term gradients (said once)

    # -- data -------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        dataset: StoreDataset = self.train_dataset  # type: ignore[assignment]
        workers = dataset.plan.num_workers
        return DataLoader(
            dataset,
            batch_size=None,  # the dataset yields collated batches
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
            multiprocessing_context=self.args.dataloader_multiprocessing_context if workers else None,
        )

    # -- loss -------------------------------------------------------------------------------------
    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if inputs.get("empty"):  # every record of the batch was in a skipped shard: train nothing
            loss = self._empty_loss(model)
            return (loss, {}) if return_outputs else loss
        terms: dict[str, torch.Tensor] | None = {} if self._logs_next_step() else None
        loss, parts = distill_loss(model, inputs, self.objective, terms)
        if "teachers_partial" in inputs:  # several stores: the share of positions not every teacher scored
            parts["teachers_partial"] = inputs["teachers_partial"].float()
        if "cross_matched" in inputs:  # --cross-tokenizer: the share of positions with an exact target
            parts["cross_matched"] = inputs["cross_matched"].float()
        if terms is not None and model.training:
            self._measure_grad_share(model, terms)
        for name, value in parts.items():
            self._part_sums[name] = self._part_sums.get(name, 0.0) + value
            self._part_batches[name] = self._part_batches.get(name, 0) + 1
        return (loss, parts) if return_outputs else loss

    def _empty_loss(self, model: Any) -> torch.Tensor:
        """A zero loss for a batch with nothing to train on, made so that the ranks of a DDP job still
        meet in the same collectives as a rank with a real batch: DDP syncs buffers and arms its
        gradient all-reduce in the wrapped model's forward (without one, its backward all-reduces
        nothing), so one token goes through it, and every parameter is touched for the all-reduce."""
        one = torch.zeros((1, 1), dtype=torch.long, device=self.args.device)
        first = torch.zeros(1, dtype=torch.long, device=self.args.device)
        out = model(input_ids=one, attention_mask=torch.ones_like(one), pos_batch=first, pos_index=first,
                    with_hidden=self.objective.needs_hidden)
        reached = out["logits"].sum() + sum(v.sum() for v in out.get("projected", {}).values())
        touched = sum(p.reshape(-1)[0] for p in model.parameters() if p.requires_grad)
        return (reached + touched) * 0.0

    def _logs_next_step(self) -> bool:
        """Whether the optimizer step being computed is a logging step and its gradient share is not
        yet measured (it is measured on the step's first micro-batch only)."""
        step = self.state.global_step + 1
        return not self._share_off and step % self.args.logging_steps == 0 and self._share_step != step

    def _share_terms(self) -> list[str]:
        """The loss terms whose gradient share is logged: fixed by the objective, the same on every
        rank. CE is left out in plain mode at α = 0 (it is then exactly 0), KD at α = 1."""
        o = self.objective
        names = ["kd"] if o.alpha < 1 else []
        if o.alpha > 0 or o.multitask:  # multitask: answer tokens are trained by CE alone
            names.append("ce")
        if o.hidden_pairs and o.hidden_weight > 0:
            names.append("hidden")
        if o.hidden_pairs and o.relation_weight > 0:
            names.append("relation")
        return names

    def _measure_grad_share(self, model: Any, terms: dict[str, torch.Tensor]) -> None:
        """grad_share/<term> = ‖∂term/∂θ‖ / Σ_terms ‖∂term/∂θ‖, θ all trained parameters, each term
        weighted as it enters the total loss (`distill_loss`), on the first micro-batch of a logging
        step: one extra backward pass per term, at logging steps only."""
        self._share_step = self.state.global_step + 1
        params = [p for p in model.parameters() if p.requires_grad]
        norms: dict[str, torch.Tensor] = {}
        for name in self._share_terms():
            term = terms.get(name)
            if term is None or not term.requires_grad:
                norms[name] = torch.zeros((), device=self.args.device)
                continue
            try:
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            except RuntimeError as e:  # a wrapper whose parameters are not the graph's leaves: train on
                self._share_off = True
                _say(f"grad_share is not logged: the gradient of one loss term alone cannot be taken here ({e})")
                return
            present = [g.detach().float() for g in grads if g is not None]
            norms[name] = _total_norm(present) if present else torch.zeros((), device=self.args.device)
        if not norms:
            return
        total = torch.stack(list(norms.values())).sum()
        self._grad_share = {
            f"grad_share/{name}": torch.where(total > 0, norm / total, torch.zeros_like(norm)) for name, norm in norms.items()
        }

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if "error" in inputs:  # the loader found a bad shard (its one line names it)
            raise TrainError(inputs["error"])
        for shard, why in inputs.pop("skipped_shards", {}).items():
            if shard not in self.skipped_shards:
                self.skipped_shards[shard] = why
                _say(f"skipping shard {shard}: {why}")
        self._step_records += inputs.get("record_ids", [])
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.batches_consumed += 1
        self._step_losses.append(loss)
        if self.accelerator.sync_gradients:  # the last micro-batch before the optimizer step
            self._stop_unless_finite(model)
        return loss

    def _stop_unless_finite(self, model: Any) -> None:
        """Stop before the optimizer step when a loss or a gradient is NaN or infinite: the weights
        are still the last sound ones, and nothing is saved. One host sync per optimizer step.
        (With fp16 the grad scaler owns overflowing gradients, so only the losses are checked.)"""
        losses = torch.stack(self._step_losses)
        finite = torch.isfinite(losses).all()
        if not self.args.fp16:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                finite = finite & torch.isfinite(_total_norm(grads))
        records, self._step_records, self._step_losses = self._step_records, [], []
        if bool(finite):
            return
        step = self.state.global_step + 1
        shown = ", ".join(repr(r) for r in records[:8]) + (f" and {len(records) - 8} more" if len(records) > 8 else "")
        checkpoint = latest_checkpoint(self.args.output_dir, self.args.process_index)
        kept = f"; {checkpoint_weights_note(checkpoint)}" if checkpoint else ""
        raise TrainError(
            f"step {step}: the loss or a gradient is not finite (losses {[round(x, 4) for x in losses.tolist()]}) "
            f"in the batch of records {shown}; stopped before the update, nothing saved{kept}"
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add each loss part, averaged over the micro-batches since the last log and over ranks, the
        gradient share of each loss term (`_measure_grad_share`), and `epoch` as the passes the loader
        made over this rank's share of the training records."""
        if "loss" in logs:
            logs.update(self._logged_parts())
            self._part_sums, self._part_batches, self._grad_share = {}, {}, {}
        dataset = self.train_dataset
        if isinstance(dataset, StoreDataset) and self.state.epoch is not None:
            # The Trainer's own epoch counts optimizer steps over a length it cannot know for a
            # stream; the loader's position is exact: micro-batches consumed / batches per epoch.
            self.state.epoch = self.batches_consumed / dataset.batches_per_epoch
        super().log(logs, start_time)

    def _logged_parts(self) -> dict[str, float]:
        """Each loss part's mean over the micro-batches since the last log, of all ranks, and each
        term's gradient share averaged over the ranks that measured it. Every rank enters the same
        collectives with the same shapes whatever its batches were: a rank whose batches were all
        empty (a skipped shard's) or that saw other parts than another adds zeros to the sums and
        counts, so no rank waits for a reduction another never enters."""
        device = self.args.device
        shares = {f"grad_share/{n}": self._grad_share.get(f"grad_share/{n}") for n in self._share_terms()}
        parts = sorted(self._part_sums)
        if self.args.world_size > 1:
            import torch.distributed as dist

            everyone: list[list[str] | None] = [None] * self.args.world_size
            dist.all_gather_object(everyone, parts)
            parts = sorted({name for names in everyone for name in names or []})
        zero = torch.zeros((), device=device)
        sums = [torch.as_tensor(self._part_sums.get(n, 0.0), device=device).float() for n in parts]
        sums += [(v if v is not None else zero).float() for v in shares.values()]
        counts = [float(self._part_batches.get(n, 0)) for n in parts] + [float(v is not None) for v in shares.values()]
        values = torch.cat([torch.stack(sums) if sums else zero.new_zeros(0), torch.tensor(counts, device=device)])
        if self.args.world_size > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        n = len(counts)
        means = values[:n] / values[n:].clamp(min=1)
        return {name: mean for name, mean, count in zip([*parts, *shares], means.tolist(), values[n:].tolist(),
                                                        strict=True) if count > 0}

    # -- optimizer --------------------------------------------------------------------------------
    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, with the student's output layer in a parameter group of its own at
        `head_lr_scale` times the learning rate. The scheduler, created after this, scales each group
        from its own rate."""
        optimizer = super().create_optimizer(model)
        if self.head_lr_scale == 1.0:
            return optimizer
        head = self.model.student.get_output_embeddings().weight
        holding = [g for g in optimizer.param_groups if any(p is head for p in g["params"])]
        if not holding:
            raise ConfigError("--head-lr-scale: the output layer's weight is not a parameter of its own in this model "
                              "(e.g. FSDP's flattened parameters); leave it at 1")
        group = holding[0]
        group["params"] = [p for p in group["params"] if p is not head]
        optimizer.add_param_group({"params": [head], "lr": group["lr"] * self.head_lr_scale,
                                   "weight_decay": group["weight_decay"]})
        return optimizer

    # -- saving ---------------------------------------------------------------------------------
    # Two private Trainer methods are overridden, because no public hook sets the format of the saved
    # weights: `_save` is where `save_model` (public, used for checkpoints and by users) hands over the
    # state dict, gathered first under FSDP/DeepSpeed; the student is saved as a model folder
    # (save_pretrained + tokenizer, projections beside it) instead of the wrapper's state dict. And
    # `_load_from_checkpoint` reads that folder back on resume. (The loader state is written by
    # `SaveLoaderState`, a callback.)
    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        if self.args.should_save:
            self.model.save(output_dir or self.args.output_dir, self.tokenizer_to_save, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self.model.load(resume_from_checkpoint)


class SaveLoaderState(TrainerCallback):
    """Writes this rank's loader position (`StoreDataset.state_dict`) into every checkpoint folder, first.

    At the end of an optimizer step the Trainer is about to save when `control.should_save` is set
    (by its flow callback, which runs before this one): writing then puts the loader state in before
    the weights and trainer_state.json, so a checkpoint with a trainer state is complete
    (`checkpoint_complete`). Writing in `on_save` would come after the Trainer has already rotated
    old checkpoints away (`--save-total-limit`), and a kill in between would leave no complete one;
    `on_save` only covers a save that a later callback asked for."""

    def __init__(self, trainer: DistillTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            self._write(args, state)

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not os.path.isfile(self._path(args, state)):
            self._write(args, state)

    def _path(self, args: TrainingArguments, state: Any) -> str:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return os.path.join(folder, loader_state_file(args.process_index))

    def _write(self, args: TrainingArguments, state: Any) -> None:
        path = self._path(args, state)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        dataset: StoreDataset = self.trainer.train_dataset  # type: ignore[assignment]
        write_json(path, dataset.state_dict(self.trainer.batches_consumed))


# The order of the numbers in a log line; the others follow in name order.
_LINE_ORDER = ("loss", "kd", "ce", "hidden", "relation", "answer_task", "rationale_task", "multitask_fallback",
               "teachers_partial", "cross_matched", "learning_rate", "grad_norm", "epoch")
_LINE_NAMES = {"learning_rate": "lr"}
_LINE_SKIP = ("total_flos", "step")


def format_log_line(logs: dict[str, Any], step: int, max_steps: int) -> str:
    """One readable line for one log step: `step 40/200  loss 3.21  kd 3.1  …  grad_share kd 0.93 hidden 0.07`
    (4 significant digits; the learning rate in exponent form)."""
    def number(name: str, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        if name == "learning_rate":
            return f"{value:.1e}"
        if isinstance(value, int):
            return str(value)
        return f"{value:.4g}"

    plain = {k: v for k, v in logs.items() if k not in _LINE_SKIP and not k.startswith("grad_share/")}
    names = [k for k in _LINE_ORDER if k in plain] + sorted(k for k in plain if k not in _LINE_ORDER)
    parts = [f"step {step}/{max_steps}"] + [f"{_LINE_NAMES.get(k, k)} {number(k, plain[k])}" for k in names]
    shares = sorted((k.split("/", 1)[1], v) for k, v in logs.items() if k.startswith("grad_share/"))
    if shares:
        parts.append("grad_share " + " ".join(f"{name} {value:.2f}" for name, value in shares))
    return "  ".join(parts)


class LogLines(ProgressCallback):
    """The Trainer's progress bar, with each log step written as one readable line (`format_log_line`)
    instead of a dict of strings; without a bar (`disable_tqdm`), the lines go to stderr alone.
    The numbers themselves are kept as they are in the trainer state, tensorboard and the report.
    The last start-up phase (`phases`) is the first step: it ends, and the bar starts, when that step does."""

    def __init__(self, phases: Phases | None = None) -> None:
        super().__init__()
        self.phases = phases

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        pass  # the bar starts after the first step, below the start-up phase lines

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.phases is not None:
            self.phases.end()
        if args.disable_tqdm:
            return
        if self.training_bar is None:
            super().on_train_begin(args, state, control, **kwargs)
        super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        line = format_log_line(logs, state.global_step, state.max_steps)
        if self.training_bar is not None:
            self.training_bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all tensors together (inf or NaN when any element is), with fused kernels where torch has them."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def write_json(path: str, data: Any) -> None:
    """Write a JSON file whole or not at all (temporary file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(out: str, rank: int = 0) -> str | None:
    """The newest complete checkpoint in `out` (see `checkpoint_complete`)."""
    if not os.path.isdir(out):
        return None
    found = []
    for name in os.listdir(out):
        match = _CHECKPOINT.match(name)
        folder = os.path.join(out, name)
        if match and checkpoint_complete(folder, rank):
            found.append((int(match.group(1)), folder))
    return max(found)[1] if found else None


def prune_checkpoints(out: str, keep: int, rank: int = 0) -> list[str]:
    """Remove what the Trainer's rotation would have after the newest complete checkpoint of `out`:
    the complete ones beyond the newest `keep` (0: keep all) and those cut short before it. Returns
    the folders removed."""
    newest = latest_checkpoint(out, rank)
    if newest is None:
        return []
    older = sorted((int(m.group(1)), os.path.join(out, name)) for name in os.listdir(out)
                   if (m := _CHECKPOINT.match(name)) and int(m.group(1)) <= checkpoint_step(newest))
    complete = [folder for _, folder in older if checkpoint_complete(folder, rank)]
    kept = set(complete[-keep:] if keep else complete)
    removed = [folder for _, folder in older if folder not in kept]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def checkpoint_complete(folder: str, rank: int = 0) -> bool:
    """Whether a checkpoint was written to the end: this rank's loader state (written first) and the
    trainer state (written last, after the weights, optimizer and RNG states) both parse. The Trainer
    writes trainer_state.json in place, not atomically, so a job killed while writing it leaves the
    file cut short: such a checkpoint is never resumed from, nor does it block a fresh start."""
    for name in (loader_state_file(rank), TRAINER_STATE):
        try:
            with open(os.path.join(folder, name)) as f:
                json.load(f)
        except (OSError, ValueError):  # missing, unreadable, cut short (JSONDecodeError, UnicodeDecodeError)
            return False
    return True


def checkpoint_weights_note(checkpoint: str) -> str:
    """What the weights of `checkpoint` are, read rather than assumed: finite, or the first tensor that is not."""
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(checkpoint)
    try:
        for path in sorted(glob.glob(os.path.join(checkpoint, "*.safetensors"))):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 -- safe_open is not a mapping
                    if not bool(torch.isfinite(f.get_tensor(key)).all()):
                        return f"its last checkpoint ({name}) holds non-finite weights too ({key}): do not resume from it"
    except (OSError, SafetensorError) as e:
        return f"its last checkpoint ({name}) is unreadable ({e})"
    return f"its last checkpoint ({name}) holds finite weights"


# The files an exact resume reads besides the weights, as the Trainer saves them (torch zip archives).
RESUME_STATES = ("optimizer.pt", "scheduler.pt")


def check_checkpoint_files(checkpoint: str) -> None:
    """Refuse, in one line naming the file, a checkpoint an exact resume cannot read: no optimizer or
    scheduler state (the Trainer would silently start them afresh), or a weights or state file cut
    short. Its trainer state is written last, so in a checkpoint that has one such a file is damage, not
    an interrupted save: never skipped for an older checkpoint."""
    from safetensors import SafetensorError, safe_open

    for name in RESUME_STATES:
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            raise ConfigError(f"--resume: {path} is missing: an exact resume needs it (restore it, or "
                              "--resume-from an earlier checkpoint)")
        try:
            zipfile.ZipFile(path).close()  # reads the archive's directory, which a cut-short file has lost
        except (OSError, zipfile.BadZipFile) as e:
            raise ConfigError(f"--resume: {path} is damaged ({e}); --resume-from an earlier checkpoint") from None
    for path in sorted(glob.glob(os.path.join(checkpoint, "*.safetensors"))):
        try:
            with safe_open(path, framework="pt"):  # checks the header against the file's size
                pass
        except (OSError, SafetensorError) as e:
            raise ConfigError(f"--resume: {path} is damaged ({e}); --resume-from an earlier checkpoint") from None


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json)."""
    path = os.path.join(checkpoint, TRAINER_STATE)
    try:
        with open(path) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"{path}: unreadable trainer state ({e})") from None


def resume_point(config: TrainConfig, rank: int) -> tuple[str | None, dict[str, Any] | None]:
    """(checkpoint folder, this rank's loader state) to resume from, or (None, None)."""
    if not (config.resume or config.resume_from):
        if latest_checkpoint(config.out, rank) is not None:  # a fresh run would mix its checkpoints with these
            raise ConfigError(
                f"--out {config.out} already holds checkpoints of a run: pass --resume to continue it, "
                "or choose another --out"
            )
        return None, None
    checkpoint = config.resume_from or latest_checkpoint(config.out, rank)
    if checkpoint is None:
        raise ConfigError(f"--resume: no complete checkpoint in {config.out}")
    path = os.path.join(checkpoint, loader_state_file(rank))
    if not os.path.isfile(path):
        raise ConfigError(f"--resume-from {checkpoint}: no {loader_state_file(rank)} (not a potstill checkpoint?)")
    check_checkpoint_files(checkpoint)
    try:
        with open(path) as f:
            return checkpoint, json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{path}: unreadable loader state ({e})") from None


def check_writable(folder: str, flag: str) -> None:
    """Refuse, in one line, a folder nothing can be written in, before any model loads: the Trainer
    would fail at its first save."""
    problem = write_problem(folder)
    if problem:
        raise ConfigError(f"{flag} {folder}: cannot write there ({problem})")


def cpu_only() -> bool:
    """No CUDA or MPS device: accelerate must be told (its `cpu` flag) to run bf16 autocast on the CPU
    and, under torchrun, to form a gloo process group instead of running each process as a lone rank."""
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def training_arguments(config: TrainConfig, max_steps: int) -> TrainingArguments:
    report_to = [r.strip() for r in config.report_to.split(",") if r.strip() and r.strip() != "none"]
    try:
        return _training_arguments(config, max_steps, report_to)
    except (ValueError, ImportError) as e:  # e.g. --fp16 without a GPU, an integration not installed
        raise ConfigError(str(e).strip().splitlines()[0]) from None


def _training_arguments(config: TrainConfig, max_steps: int, report_to: list[str]) -> TrainingArguments:
    return TrainingArguments(
        output_dir=config.out,
        max_steps=max_steps,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        bf16=config.bf16,
        fp16=config.fp16,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit or None,
        logging_steps=config.logging_steps,
        report_to=report_to or "none",
        seed=config.seed,
        dataloader_num_workers=config.num_workers,
        ignore_data_skip=True,  # the loader state skips exactly, without reading the skipped batches
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        use_cpu=cpu_only(),
    )


def _say(message: str) -> None:
    print(f"potstill train: {message}", file=sys.stderr, flush=True)


def train(config: TrainConfig, callbacks: list[Any] | None = None, phases: Phases | None = None) -> dict[str, Any]:
    """Train a student from a store as `config` says; return the training report (main process).

    The teacher is never loaded: everything comes from the store. `callbacks` are extra
    `transformers.TrainerCallback`s (progress display, early stop). `phases` names the start-up
    phases as they begin (the CLI's, shown on stderr; by default they are timed only); the report
    gives their times.
    """
    phases = phases or Phases(show=False)
    try:
        phases.begin("open store")
        run = open_run(config)
        run.phases = phases
        phases.begin("load student")
        student = load_student_for(run)
        dataset = run.dataset(student)
        max_steps = run.max_steps(dataset)
        phases.end()
        announce(run, dataset, max_steps)
        phases.begin("first step")  # ended by LogLines when the step is done
        trainer = make_trainer(run, student, dataset, max_steps, callbacks)
        train_loss = train_or_resume(run, trainer, max_steps)
        phases.end()  # a run that had already finished takes no step
        share_skipped_shards(run, trainer)
        run.store.mark_checked(dataset.checked_shards())  # by the job's loaders: the final evaluation checks no shard again
        end_job_checks(run.checks_folder)
    except BaseException:
        phases.end(failed=True)  # the error's line starts on a line of its own
        raise
    if not run.is_main:
        return {"global_step": trainer.state.global_step, "rank": run.rank}
    return finish(run, trainer, student, dataset, max_steps, train_loss)


@dataclass
class Run:
    """What one `train` call fixes before any model is loaded, shared by every later step: this
    process's rank, the store (opened once per process), the split and sample order (planned once:
    the loader and the final evaluation both take it), where the run resumes, what it trains on."""

    config: TrainConfig
    rank: int
    world_size: int
    is_main: bool
    store: Store
    plan: LoaderPlan
    checkpoint: str | None  # the checkpoint resumed from
    loader_state: dict[str, Any] | None  # this rank's loader state in it
    targets: str  # the loader shape trained on (`training_targets`)
    objective: Objective
    started: float  # time.time() at the start, for the report's train_seconds
    teachers: Teachers | None = None  # several stores: the ones besides `store`, joined to its plan
    phases: Phases | None = None  # the start-up phases, timed for the report
    checks_folder: str | None = None  # several ranks: where they share their shards' verdicts (`job_checks_folder`)

    def dataset(self, student: Student) -> StoreDataset:
        """This rank's loader over the run's store and plan, at the resumed position when resuming."""
        c = self.config
        kind, extra = (StoreDataset, {}) if self.teachers is None else (MixedDataset, {"teachers": self.teachers})
        if c.cross_tokenizer:  # the student's own tokens, aligned to the teacher's (student_train/cross_tokenizer.py)
            kind, extra = CrossTokenizerDataset, {"cross": CrossTokenizer(self.store, student.tokenizer_dir),
                                                  "student_fingerprint": student_fingerprint(student.tokenizer)}
        dataset = kind(
            self.store,
            self.plan,
            **extra,
            batch_size=c.batch_size,
            seed=c.seed,
            shuffle_buffer=c.shuffle_buffer,
            rank=self.rank,
            hidden_layers=self.objective.teacher_layers,
            max_length=c.max_length,
            student_vocab=student.vocab,
            pad_id=student.tokenizer.pad_token_id if student.tokenizer.pad_token_id is not None else 0,
            rationale_mode=c.rationale_mode,
            answer_marker_ids=student.marker_ids,
            targets=self.targets,
            skip_bad_shards=c.skip_bad_shards,
            checks_folder=self.checks_folder,
        )
        if self.loader_state is not None:
            where = os.path.join(self.checkpoint or "", loader_state_file(self.rank))
            dataset.load_state_dict(self.loader_state, where=where)
        return dataset

    def max_steps(self, dataset: StoreDataset) -> int:
        """--max-steps, else the optimizer steps that make --epochs passes over this rank's share."""
        c = self.config
        return c.max_steps if c.max_steps > 0 else dataset.steps_for_epochs(c.epochs, c.grad_accum)

    def say(self, message: str) -> None:
        """One line on stderr, from the main process only."""
        if self.is_main:
            _say(message)


@dataclass
class Student:
    """The student as loaded and checked against the store (`load_student_for`)."""

    model: Any  # the causal LM
    tokenizer: Any
    tokenizer_source: str  # where the tokenizer came from (the student's folder or the store)
    vocab: int  # the student's output logits
    marker_ids: tuple[int, ...]  # --rationale-mode multitask: the answer marker's tokens
    tokenizer_dir: str = ""  # --cross-tokenizer: the folder the student's tokenizer loads from


def open_run(config: TrainConfig) -> Run:
    """Validate the settings, join the process group (torchrun), open the store, find the resume
    point and plan the split: everything that can refuse the run before a model is loaded."""
    from accelerate import PartialState

    config.validate()
    check_writable(config.out, "--out")
    started = time.time()
    state = PartialState(cpu=cpu_only())  # under torchrun: joins the process group, gives rank and world size
    rank, world = state.process_index, state.num_processes
    checks_folder = job_checks_folder()  # (every rank, before anything that may refuse the run on one rank alone)
    urls, weights = order_stores(config.stores, config.weights(), config.hidden_from)
    stores = [open_store(url, strict=not config.skip_bad_shards, verify_reads=True) for url in urls]
    store = stores[0]  # the primary: sequences, split, hidden states, rationales (student_train/teachers.py)
    store.check_tokenizer_files()  # as verify does, whether or not the student brings its own tokenizer
    checkpoint, loader_state = resume_point(config, rank)
    if config.cross_tokenizer:
        check_cross_settings(config, stores)
        targets = "cross"  # the store's top-k rows, aligned to the student's tokens
    else:
        targets = training_targets(config, *stores)
    pairs = resolve_hidden_pairs(config.hidden_pairs(), store.manifest.teacher.num_hidden_layers)
    objective = dataclasses.replace(Objective.from_config(config), targets=targets, hidden_pairs=tuple(pairs))
    # A resumed run keeps the shards it started with: the store may have grown since.
    plan = plan_split(store, config.eval_fraction, world, config.num_workers,
                      loader_state["shards"] if loader_state else None)
    teachers = None
    if loader_state and loader_state.get("teachers") and len(stores) == 1:
        raise ConfigError(f"--resume: {checkpoint} is a run of several teachers ({', '.join(loader_state['teachers'])} "
                          "besides this store); an exact resume needs the same --store values")
    if len(stores) > 1:
        teachers, plan = Teachers.open(store, plan, stores[1:], weights[1:],
                                       loader_state.get("teacher_shards") if loader_state else None)
    return Run(config, rank, world, state.is_main_process, store, plan, checkpoint, loader_state, targets,
               objective, started, teachers, checks_folder=checks_folder)


def load_student_for(run: Run) -> Student:
    """Load the student (seeded, so a random init is reproducible) and its tokenizer, and refuse in one
    line any that cannot learn from this store: another tokenizer, too few output logits, hidden layers
    that do not map, untrained weights where trained ones were meant, a head that does not fit."""
    from transformers import set_seed

    config, store = run.config, run.store
    set_seed(config.seed)
    model = load_student(config.student, trust_remote_code=config.trust_remote_code)
    tokenizer, source = load_tokenizer(config.student, store)
    if config.cross_tokenizer:
        vocab = check_cross_vocab(model, tokenizer, source)
        own = source == config.student  # else the store's tokenizer (load_tokenizer)
        return Student(model, tokenizer, source, vocab, (), config.student if own else store.tokenizer_dir)
    check_tokenizer(tokenizer, store, source, hint=" (--cross-tokenizer distills into a student with its own tokenizer)")
    vocab = check_vocab(model, store)
    check_hidden_map(model, store, list(run.objective.hidden_pairs))
    check_weights(model, config.student)
    check_head(model, vocab)
    marker_ids: tuple[int, ...] = ()
    if run.objective.multitask:
        if not store.manifest.rationales:
            raise ConfigError(f"--rationale-mode multitask: {store.url} holds no rationales (manifest rationales=false)")
        marker_ids = tuple(tokenizer(config.answer_marker, add_special_tokens=False)["input_ids"])
    return Student(model, tokenizer, source, vocab, marker_ids)


def check_cross_vocab(model: Any, tokenizer: Any, source: str) -> int:
    """--cross-tokenizer: the student must have a logit for every id of its own tokenizer."""
    from potstill.student_train.model import output_rows

    rows = output_rows(model)
    if rows < len(tokenizer):
        raise ConfigError(f"student has {rows} output logits but its tokenizer ({source}) has {len(tokenizer)} tokens")
    return rows


def announce(run: Run, dataset: StoreDataset, max_steps: int) -> None:
    """Say what the run will do: records, shards, ranks × workers, repeats, steps, the resume point."""
    info = dataset.describe()
    run.say(
        f"{info['train_records']} training / {info['eval_records']} held-out records in {info['shards']} shards "
        f"({run.targets} targets); "
        f"{run.world_size} rank(s) × {max(run.config.num_workers, 1)} loader worker(s); {info['repeated_per_epoch']} "
        f"sample(s) repeated per epoch to even the ranks; {max_steps} optimizer steps"
        + (f"; resuming from {run.checkpoint}" if run.checkpoint else "")
    )
    if info["eval_note"]:
        run.say(f"held-out: {info['eval_note']}")
    for teacher in info.get("teachers", [])[1:]:  # several stores: what the join by id left out
        run.say(f"teacher {teacher['store']} (weight {teacher['weight']:.3g}): {teacher['missing_records']} record(s) "
                f"of {run.store.url} missing there and left out; {teacher['extra_records']} of its record(s) not in "
                f"{run.store.url}, unused")


def make_trainer(run: Run, student: Student, dataset: StoreDataset, max_steps: int,
                 callbacks: list[Any] | None) -> DistillTrainer:
    """The Trainer around the student (with the hidden-state projections the objective needs), its log
    lines, the loader state in every checkpoint, and the loader's position and skipped shards so far."""
    config, objective = run.config, run.objective
    teacher_widths = {layer.index: layer.width for layer in run.store.manifest.hidden.layers}
    model = DistillModel(student.model, list(objective.hidden_pairs), teacher_widths, project=objective.hidden_weight > 0)
    trainer = DistillTrainer(
        model=model,
        args=training_arguments(config, max_steps),
        train_dataset=dataset,
        objective=objective,
        tokenizer_to_save=student.tokenizer,
        callbacks=callbacks,
        head_lr_scale=config.head_lr_scale,
    )
    for default_printer in (ProgressCallback, PrinterCallback):  # they print dicts of strings
        trainer.remove_callback(default_printer)
    trainer.add_callback(LogLines(run.phases))
    trainer.add_callback(SaveLoaderState(trainer))  # last: it must see every callback's should_save
    trainer.batches_consumed = dataset.batches_consumed
    for shard, why in dataset.bad_shards.items():  # damaged commit records, found at open
        trainer.skipped_shards[shard] = why
        run.say(f"skipping shard {shard}: {why}")
    return trainer


def train_or_resume(run: Run, trainer: DistillTrainer, max_steps: int) -> float | None:
    """Train to `max_steps` (from the resume point); the training loss, or None for a run that had
    already finished: it never trains past --max-steps, it only loads its last checkpoint to finish
    its outputs."""
    checkpoint = run.checkpoint
    done = checkpoint_step(checkpoint) if checkpoint else 0
    if checkpoint and done >= max_steps:
        _say(f"{checkpoint} is at step {done} of {max_steps}: nothing left to train")
        trainer.model.load(checkpoint)
        trainer.state = trainer.state.load_from_json(os.path.join(checkpoint, TRAINER_STATE))
        if run.is_main:  # a job killed after its last checkpoint's state, before the Trainer pruned the older ones
            prune_checkpoints(run.config.out, run.config.save_total_limit, run.rank)
        return None
    try:
        return trainer.train(resume_from_checkpoint=checkpoint).training_loss
    except ValueError as e:  # torch, loading the optimizer: "loaded state dict has a different number of parameter groups"
        if not checkpoint or "parameter group" not in str(e):
            raise
        raise ConfigError(f"--resume: {checkpoint}'s optimizer has other parameter groups than this run's "
                          "(one of the two has --head-lr-scale 1 and the other not); resume with that run's settings") from None


def share_skipped_shards(run: Run, trainer: DistillTrainer) -> None:
    """Several ranks: each learns of the shards the others skipped (each skips those its own batches
    meet), says the same line for each new one, and so the report names every shard the job left
    out, as a one-process run's does. Every rank must call it (a collective)."""
    if run.world_size < 2:
        return
    import torch.distributed as dist

    everyone: list[dict[str, str] | None] = [None] * run.world_size
    dist.all_gather_object(everyone, trainer.skipped_shards)
    for skipped in everyone:
        for shard, why in sorted((skipped or {}).items()):
            if shard not in trainer.skipped_shards:
                trainer.skipped_shards[shard] = why
                _say(f"skipping shard {shard}: {why}")


def finish(run: Run, trainer: DistillTrainer, student: Student, dataset: StoreDataset, max_steps: int,
           train_loss: float | None) -> dict[str, Any]:
    """Main process: save the student to --out, evaluate it on the plan's held-out records, write the
    training report and the loss curve; return the report."""
    config = run.config
    trainer.model.save(config.out, student.tokenizer)
    final_eval = final_evaluation(run, student, trainer.skipped_shards)
    report = {
        "potstill_version": potstill_version(),
        "settings": config.to_dict(),
        "store": store_identity(run.store, run.plan.shards),
        **({"teachers": [{**store_identity(store, partner.shards), "weight": partner.weight}
                         for partner, store in zip(run.teachers.partners, run.teachers.stores, strict=True)]}
           if run.teachers else {}),
        "student": {
            "source": config.student,
            "architecture": type(student.model).__name__,
            "parameters": sum(p.numel() for p in student.model.parameters()),
            "output_logits": student.vocab,
            "tokenizer": student.tokenizer_source,
        },
        "loader": dataset.describe(),
        "skipped_shards": trainer.skipped_shards,  # --skip-bad-shards: shards left out, with why (by any rank)
        "targets": run.targets,
        "world_size": run.world_size,
        "global_step": trainer.state.global_step,
        "max_steps": max_steps,
        "resumed_from": run.checkpoint,
        "train_loss": train_loss,
        "train_seconds": round(time.time() - run.started, 3),
        "phases": {name: round(s, 3) for name, s in (run.phases.seconds if run.phases else {}).items()},
        "loss_curve": [
            dict(entry)  # every loss part, lr, grad_norm, grad_share/*, epoch (passes over the store)
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
        "final_eval": final_eval,
    }
    write_json(os.path.join(config.out, REPORT_FILE), report)
    write_loss_curve(os.path.join(config.out, LOSS_CURVE_FILE), trainer.state.log_history, final_eval)
    return report


def training_targets(config: TrainConfig, store: Store, *others: Store) -> str:
    """The stored targets this run trains on (`--targets`, "auto" resolved; with several stores, the
    shape they all train on), or a one-line refusal."""
    if others:
        targets = resolve_targets(config.targets, [store, *others], config.sampled_loss_ok())
    else:
        kind = store.manifest.targets.target_kind
        targets = config.targets if config.targets != "auto" else kind.default_train_target(config.sampled_loss_ok())
        check_targets(store, targets)
    if targets == "sampled" and not config.sampled_loss_ok():
        raise ConfigError(
            f"store {store.url} holds only sampled targets, which train forward KL at temperature 1 only; "
            f"got --loss {config.loss} --kd-temperature {config.kd_temperature}"
        )
    return targets


def store_identity(store: Store, shards: list[str]) -> dict[str, Any]:
    """Which store and manifest a run trained from, and which of its shards."""
    m = store.manifest
    return {
        "url": store.url,
        "format_version": m.format_version,
        "created_at": m.created_at,
        "teacher": dataclasses.asdict(m.teacher),
        "tokenizer_fingerprint": m.tokenizer.fingerprint,
        "targets": dataclasses.asdict(m.targets),
        "hidden_layers": [layer.index for layer in m.hidden.layers],
        "shards": len(shards),
        "shards_sha256": hashlib.sha256("\n".join(shards).encode()).hexdigest(),
    }


def final_evaluation(run: Run, student: Student, skipped_shards: dict[str, str]) -> dict[str, Any]:
    """The trained student on the held-out records of the run's own plan (never trained on), less those
    of the shards the run skipped (--skip-bad-shards: and of any other shard that fails its checks)."""
    from potstill.student_train.evaluation import evaluate

    config = run.config
    if config.eval_fraction <= 0:
        return {"records": 0, "note": "none (--eval-fraction 0)"}
    if config.cross_tokenizer:
        plan = dataclasses.replace(run.plan, held_out=[(n, r) for n, r in run.plan.held_out if n not in skipped_shards])
        return evaluate_cross(run.store, plan, student.model, student.tokenizer,
                              CrossTokenizer(run.store, student.tokenizer_dir), max_records=config.eval_max_records,
                              batch_size=config.batch_size, max_new_tokens=config.eval_max_new_tokens)
    return evaluate(
        run.store,
        model=student.model,
        tokenizer=student.tokenizer,
        plan=run.plan,
        teachers=run.teachers,
        max_records=config.eval_max_records,
        batch_size=config.batch_size,
        max_new_tokens=config.eval_max_new_tokens,
        skip_shards=skipped_shards,
        skip_bad_shards=config.skip_bad_shards,
    )
