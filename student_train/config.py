"""Settings of a training run: one dataclass, filled from defaults, then a YAML, TOML or JSON file
(`--config FILE`), then command-line flags — the same defaults everywhere. Each field's flag, help and
shown default are declared with it (potstill/settings.py)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from potstill.settings import check_settings, load_settings, same_as, setting
from potstill.student_train.errors import ConfigError

# The shortest --max-length that trains anything: position 0 is never predicted (nothing precedes it).
MIN_TRAIN_LENGTH = 2

Loss = Literal["forward_kl", "reverse_kl", "jsd"]
Targets = Literal["auto", "topk", "sampled"]  # "auto" and the loader's shapes (store.targets.TRAIN_TARGETS)
HiddenLoss = Literal["standardized_mse", "cosine", "mse"]
RationaleMode = Literal["plain", "multitask"]


def _hidden_map_text(value: Any) -> Any:
    """A file may give `hidden_map` as a mapping {student: teacher} or a list of "s:t" entries."""
    if isinstance(value, dict):
        return ",".join(f"{s}:{t}" for s, t in value.items())
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def _number_list_text(value: Any) -> Any:
    """A file may give `teacher_weights` as a list of numbers."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


@dataclass
class TrainConfig:
    """Every setting of `potstill train`. Field names are the config-file keys; flags are the same
    names with dashes (`max_steps` <-> `--max-steps`) unless a field names its own."""

    # what to train, from what, into where
    store: list[str] = setting(factory=list, required=True, help=(
        "Store to train from, path or URL, or a folder `potstill store publish` wrote (also "
        "hf://datasets/OWNER/NAME); repeat it to distill several teachers at once (their stores "
        "made over the same prompts, with one tokenizer): the target is their weighted mixture."))
    teacher_weights: str = setting("", parse=_number_list_text, metavar="W,...", shown_default="equal", help=(
        "Several stores: each teacher's weight in the mixture, in --store order (normalised to sum 1)."))
    hidden_from: str = setting("", shown_default="the first --store", help=(
        "Several stores: the one whose token sequences, rationales and hidden states the student reads "
        "(the others add their targets where their sequence agrees)."))
    student: str = setting("", required=True, help=(
        "Student: model folder to start from, or a config (folder or .json) to build one."))
    out: str = setting("", required=True, help=(
        "Folder to write: student, tokenizer, projections, checkpoints, training_report.json."))
    trust_remote_code: bool = setting(False, help="Allow the student's own modelling code.")
    cross_tokenizer: bool = setting(False, help=(
        "Let a student with its own tokenizer learn from a store made with another: tokens aligned by the "
        "text they cover; exact targets where tokens match, the teacher's probability of the text where a "
        "student token spans whole teacher tokens, ULD elsewhere."))

    # schedule
    max_steps: int = setting(-1, help="Optimizer steps (> 0 overrides --epochs).")
    epochs: float = setting(1.0, help="Passes over the training records.")
    lr: float = setting(1e-4, help="Peak learning rate.")
    lr_scheduler: str = setting("linear", help="transformers scheduler name (linear, cosine, constant, ...).")
    warmup_steps: int = setting(0, help="Warm-up steps.")
    weight_decay: float = setting(0.0, help="AdamW weight decay.")
    max_grad_norm: float = setting(1.0, help="Gradient clipping norm (0: off).")
    # Sampled targets give the output layer's rows of rare ids noisy gradients, so AdamW takes small
    # steps there (docs/guides/train.md, "The output layer").
    head_lr_scale: float = setting(1.0, help="The output layer's learning rate, a multiple of --lr.")
    batch_size: int = setting(8, help="Records per micro-batch per rank.")
    grad_accum: int = setting(1, help="Micro-batches per optimizer step.")
    max_length: int = setting(0, help="Truncate sequences to this many tokens (0: never).")

    # logit distillation
    loss: Loss = setting("forward_kl", help="The KD divergence.")
    beta: float = setting(0.5, help="JSD teacher weight, 0 < beta < 1.")
    kd_temperature: float = setting(1.0, aliases=("--temperature",),
                                    help="Distillation temperature T (the KD loss is scaled by T²).")
    alpha: float = setting(0.0, help="Weight of CE on the hard tokens; KD gets 1 - alpha.")
    tail: bool = setting(True, help="The tail (mass outside the top-K) as an extra bucket (else renormalise the top-K).")
    targets: Targets = setting("auto", help=(
        "Stored targets to train on; auto: sampled when the store has them and the loss is forward KL "
        "at T=1, else top-k."))

    # hidden-state and relation distillation
    hidden_map: str = setting("", parse=_hidden_map_text, metavar="S:T,...", shown_default="none", help=(
        "Student hidden_states index : stored teacher layer, e.g. '4:8,8:-1' (-1 = the teacher's last, "
        "as in generate --hidden-layers)."))
    # Scale-free by default: real LLMs' massive activations (a few coordinates in the tens of
    # thousands) make a raw MSE swamp KD (docs/guides/train.md, bench/hidden_loss.py).
    hidden_loss: HiddenLoss = setting("standardized_mse", help="Hidden-state loss (mse: raw states, scale-dependent).")
    hidden_weight: float = setting(1.0, help="Weight of the hidden-state loss.")
    relation_weight: float = setting(0.0, help="Weight of the token-relation loss (on the --hidden-map pairs).")

    # rationales
    rationale_mode: RationaleMode = setting("plain", help="plain, or multitask (distilling step-by-step).")
    rationale_weight: float = setting(1.0, help="Multitask: weight of the prompt -> rationale task.")
    answer_marker: str = setting(" [answer]", help="Multitask: text between prompt and answer in the answer task.")

    # data
    seed: int = setting(42, help="Seed of init, shard order and shuffle.")
    shuffle_buffer: int = setting(1024, help="Shuffle buffer per loader worker (records).")
    eval_fraction: float = setting(0.05, help="Records held out by id hash; training never sees them.")
    num_workers: int = setting(2, help="DataLoader worker processes per rank.")
    skip_bad_shards: bool = setting(False, help=(
        "Leave out (and report) shards whose files or values fail their checks, instead of stopping."))

    # precision, checkpoints, logging
    bf16: bool = setting(False, help="bfloat16 mixed precision.")
    fp16: bool = setting(False, help="float16 mixed precision.")
    resume: bool = setting(False, help="Continue from the latest complete checkpoint in --out.")
    resume_from: str = setting("", shown_default="none", help="Continue from this checkpoint folder.")
    save_steps: int = setting(500, help="Checkpoint every N steps.")
    save_total_limit: int = setting(3, help="Checkpoints kept (0: all).")
    logging_steps: int = setting(10, help="Log every N steps.")
    report_to: str = setting("tensorboard", help="tensorboard, none, or another transformers integration.")

    # final evaluation on the held-out records
    eval_max_records: int = setting(512, help="Held-out records in the final eval (0: all).")
    eval_max_new_tokens: int = setting(128, help="Final eval: greedy generation length for answers.")

    @classmethod
    def build(cls, config_file: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Defaults, then the file (keys as the fields, optionally under `[train]`), then the overrides
        (flags given on the command line; None = not given); checked."""
        return load_settings(cls, config_file, overrides, error=ConfigError, section="train")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sampled_loss_ok(self) -> bool:
        """Whether the KD loss can use sampled targets: only forward KL at T = 1 is linear in p."""
        return self.loss == "forward_kl" and self.kd_temperature == 1.0

    def hidden_pairs(self) -> list[tuple[int, int]]:
        return parse_hidden_map(self.hidden_map)

    @property
    def uses_hidden(self) -> bool:
        """Whether the teacher's hidden states must be read from the store."""
        return bool(self.hidden_map) and (self.hidden_weight > 0 or self.relation_weight > 0)

    @property
    def stores(self) -> list[str]:
        """The stores to train from, in --store order (a single path given as text counts as one)."""
        return [self.store] if isinstance(self.store, str) else list(self.store)

    def weights(self) -> list[float]:
        """Each store's weight in the mixture, in --store order, summing to 1."""
        n = len(self.stores)
        if not self.teacher_weights.strip():
            return [1.0 / n] * n
        try:
            raw = [float(w) for w in self.teacher_weights.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"--teacher-weights: expected numbers such as '2,1', got {self.teacher_weights!r}") from None
        if len(raw) != n:
            raise ConfigError(f"--teacher-weights gives {len(raw)} weight(s) for {n} store(s)")
        if not all(math.isfinite(w) and w > 0 for w in raw):
            raise ConfigError(f"--teacher-weights must all be positive finite numbers, got {self.teacher_weights!r}")
        return [w / sum(raw) for w in raw]

    def validate(self) -> TrainConfig:
        """Check each setting on its own; checks against the store and student happen at start."""
        if isinstance(self.store, str):  # built in code with one path
            self.store = [self.store] if self.store else []
        check_settings(self, ConfigError)
        check_finite(self)
        checks = [
            (self.max_steps > 0 or self.epochs > 0, "--max-steps or --epochs must be positive"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.head_lr_scale > 0, f"--head-lr-scale must be positive, got {self.head_lr_scale}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.max_length == 0 or self.max_length >= MIN_TRAIN_LENGTH,
             f"--max-length must be 0 (never truncate) or at least {MIN_TRAIN_LENGTH}, got {self.max_length}: "
             "a shorter sequence has no token to predict"),
            (self.max_grad_norm >= 0, f"--max-grad-norm must be 0 (off) or positive, got {self.max_grad_norm}"),
            (self.weight_decay >= 0, f"--weight-decay must not be negative, got {self.weight_decay}"),
            (0 < self.beta < 1, f"--beta must lie strictly between 0 and 1, got {self.beta}"),
            (self.kd_temperature > 0, f"--kd-temperature must be positive, got {self.kd_temperature}"),
            (0 <= self.alpha <= 1, f"--alpha must lie in [0, 1], got {self.alpha}"),
            (self.hidden_weight >= 0, f"--hidden-weight must not be negative, got {self.hidden_weight}"),
            (self.relation_weight >= 0, f"--relation-weight must not be negative, got {self.relation_weight}"),
            (self.rationale_weight >= 0, f"--rationale-weight must not be negative, got {self.rationale_weight}"),
            (self.shuffle_buffer >= 0, f"--shuffle-buffer must not be negative, got {self.shuffle_buffer}"),
            (0 <= self.eval_fraction < 1, f"--eval-fraction must lie in [0, 1), got {self.eval_fraction}"),
            (self.num_workers >= 0, f"--num-workers must not be negative, got {self.num_workers}"),
            (not (self.bf16 and self.fp16), "--bf16 and --fp16 exclude each other"),
            (self.save_steps >= 1, f"--save-steps must be at least 1, got {self.save_steps}"),
            (self.logging_steps >= 1, f"--logging-steps must be at least 1, got {self.logging_steps}"),
            (self.relation_weight == 0 or bool(self.hidden_map), "--relation-weight needs --hidden-map (the layer pairs)"),
            (self.targets != "sampled" or self.sampled_loss_ok(),
             f"--targets sampled trains forward KL at temperature 1 only (the draws estimate the T=1 distribution), "
             f"got --loss {self.loss} --kd-temperature {self.kd_temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.hidden_pairs()  # parse errors surface now
        self.weights()
        if self.hidden_from and self.hidden_from not in self.stores:
            raise ConfigError(f"--hidden-from {self.hidden_from} is not one of the --store values")
        return self


@dataclass
class EvalConfig:
    """Every setting of `potstill eval` (no config file: flags only)."""

    store: list[str] = setting(factory=list, required=True, help=(
        "Store to evaluate against, path or URL, or a folder `potstill store publish` wrote; repeat it for "
        "several teachers (against their mixture)."))
    teacher_weights: str = same_as(TrainConfig, "teacher_weights")
    student: str = setting("", required=True, aliases=("--model",), help="Student folder (what potstill train wrote).")
    eval_fraction: float | None = setting(None, shown_default="the model's training report, else 0.05",
                                          help="Held-out fraction.")
    max_records: int = setting(0, help="Evaluate at most N held-out records (0: all).")
    batch_size: int = setting(8, help="Records per forward pass.")
    max_new_tokens: int = setting(128, help="Greedy generation length for answer accuracy.")
    answers: bool = setting(True, help="Answer accuracy (greedy generation); --no-answers skips it.")
    device: str | None = setting(None, shown_default="where the model loads", help="cpu, cuda, cuda:1, ...")

    def validate(self) -> EvalConfig:
        if isinstance(self.store, str):
            self.store = [self.store] if self.store else []
        check_settings(self, ConfigError)
        check_finite(self)
        checks = [
            (self.eval_fraction is None or 0 <= self.eval_fraction < 1,
             f"--eval-fraction must lie in [0, 1), got {self.eval_fraction}"),
            (self.max_records >= 0, f"--max-records must not be negative, got {self.max_records}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {self.max_new_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        TrainConfig.weights(self)  # type: ignore[arg-type]
        return self

    @property
    def stores(self) -> list[str]:
        return [self.store] if isinstance(self.store, str) else list(self.store)


def check_finite(config: Any) -> None:
    """Every float setting is a finite number: NaN fails every comparison, so a check such as
    `max_grad_norm > 0` would read NaN as "off" and infinities slip through range checks."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


def parse_hidden_map(text: str) -> list[tuple[int, int]]:
    """`"4:8,8:-1"` → [(4, 8), (8, -1)]: (student hidden_states index, teacher layer index). A negative
    teacher index counts from the teacher's last layer, as `potstill generate --hidden-layers` does;
    `resolve_hidden_pairs` turns it into the absolute index the store records."""
    pairs: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            s, t = part.split(":")
            pair = (int(s), int(t))
        except ValueError:
            raise ConfigError(f"--hidden-map entry {part!r} is not STUDENT_LAYER:TEACHER_LAYER (e.g. 4:8)") from None
        if pair[0] < 0:
            raise ConfigError(f"--hidden-map entry {part!r}: the student layer index must not be negative")
        if pair in pairs:
            raise ConfigError(f"--hidden-map lists {part!r} twice")
        pairs.append(pair)
    return pairs


def resolve_hidden_pairs(pairs: list[tuple[int, int]], teacher_layers: int | None) -> list[tuple[int, int]]:
    """`pairs` with negative teacher indices made absolute against the teacher's `teacher_layers`
    (-1 = hidden_states[teacher_layers], the last, as generate maps it)."""
    resolved: list[tuple[int, int]] = []
    for s, t in pairs:
        if t < 0:
            if not teacher_layers:
                raise ConfigError(f"--hidden-map {s}:{t}: the store does not record the teacher's layer count, "
                                  "so a negative layer cannot be resolved; give the absolute index")
            if t < -(teacher_layers + 1):
                raise ConfigError(f"--hidden-map {s}:{t}: the teacher has hidden_states 0..{teacher_layers} "
                                  f"({-(teacher_layers + 1)}..-1 from the end)")
            t += teacher_layers + 1
        if (s, t) in resolved:
            raise ConfigError(f"--hidden-map lists {s}:{t} twice")
        resolved.append((s, t))
    return resolved


def build_config(config_file: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the file, then the overrides (flags given on the command line; None = not given)."""
    return TrainConfig.build(config_file, overrides)
