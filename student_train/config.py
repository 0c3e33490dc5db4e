"""Settings of a training run: one dataclass, filled from defaults, then a YAML/TOML file
(`--config FILE`), then command-line flags — the same defaults everywhere."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from potstill.store.targets import TRAIN_TARGETS
from potstill.student_train.errors import ConfigError

LOSSES = ("forward_kl", "reverse_kl", "jsd")
TARGETS = ("auto", *TRAIN_TARGETS)  # the loader's shapes; "auto": the store's kind chooses
HIDDEN_LOSSES = ("standardized_mse", "cosine", "mse")
RATIONALE_MODES = ("plain", "multitask")


@dataclass
class TrainConfig:
    """Every setting of `potstill train`. Field names are the config-file keys; flags are the same
    names with dashes (`max_steps` ↔ `--max-steps`)."""

    # what to train, from what, into where
    store: str = ""  # store path or fsspec URL
    student: str = ""  # a model folder to start from, or a config (folder or .json file) to build one from
    out: str = ""  # output folder: the student, its tokenizer, projections, checkpoints, training_report.json
    trust_remote_code: bool = False

    # schedule
    max_steps: int = -1  # optimizer steps; > 0 overrides `epochs`
    epochs: float = 1.0
    lr: float = 1e-4
    lr_scheduler: str = "linear"  # any transformers scheduler name (linear, cosine, constant, ...)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # The output layer's learning rate, a multiple of lr. Sampled targets give its rows of rare ids
    # noisy gradients, so AdamW takes small steps there (docs/training.md, "The output layer").
    head_lr_scale: float = 1.0
    batch_size: int = 8  # records per micro-batch per rank
    grad_accum: int = 1
    max_length: int = 0  # truncate sequences to this many tokens (0: never)

    # logit distillation
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    beta: float = 0.5  # JSD mixture weight of the teacher, 0 < beta < 1
    temperature: float = 1.0
    alpha: float = 0.0  # weight of cross-entropy on the hard tokens; KD gets 1 - alpha
    tail: bool = True  # the tail as one extra bucket (False: renormalise over the top-K)
    targets: str = "auto"  # topk | sampled | auto (sampled when the store has them and the loss can use them)

    # hidden-state and relation distillation
    hidden_map: str = ""  # "student_layer:teacher_layer,..." (Hugging Face hidden_states indices)
    # standardized_mse | cosine | mse. Scale-free by default: real LLMs' massive activations (a few
    # coordinates in the tens of thousands) make a raw MSE swamp KD (docs/training.md, bench/hidden_loss.py).
    hidden_loss: str = "standardized_mse"
    hidden_weight: float = 1.0  # used when hidden_map is set
    relation_weight: float = 0.0  # token-token similarity matching on the hidden_map pairs

    # rationales
    rationale_mode: str = "plain"  # plain | multitask
    rationale_weight: float = 1.0  # multitask: weight of the prompt -> rationale task
    answer_marker: str = " [answer]"  # multitask: text between prompt and answer in the answer task

    # data
    seed: int = 42
    shuffle_buffer: int = 1024  # records in the bounded shuffle buffer of each loader worker
    eval_fraction: float = 0.05  # records held out by id hash; training never sees them
    num_workers: int = 2  # dataloader worker processes per rank
    skip_bad_shards: bool = False  # leave out (and report) shards that fail their checks instead of stopping

    # precision, checkpoints, logging
    bf16: bool = False
    fp16: bool = False
    resume: bool = False  # continue from the latest complete checkpoint in `out`
    resume_from: str = ""  # or from this checkpoint folder
    save_steps: int = 500
    save_total_limit: int = 3  # checkpoints kept (0: all)
    logging_steps: int = 10
    report_to: str = "tensorboard"  # tensorboard | none | any transformers integration

    # final evaluation on the held-out records
    eval_max_records: int = 512  # 0: all held-out records
    eval_max_new_tokens: int = 128  # greedy generation length for answer accuracy

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sampled_loss_ok(self) -> bool:
        """Whether the KD loss can use sampled targets: only forward KL at T = 1 is linear in p."""
        return self.loss == "forward_kl" and self.temperature == 1.0

    def hidden_pairs(self) -> list[tuple[int, int]]:
        return parse_hidden_map(self.hidden_map)

    @property
    def uses_hidden(self) -> bool:
        """Whether the teacher's hidden states must be read from the store."""
        return bool(self.hidden_map) and (self.hidden_weight > 0 or self.relation_weight > 0)

    def validate(self) -> TrainConfig:
        """Check each setting on its own; checks against the store and student happen at start."""
        for name in ("store", "student", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        choices = {"loss": LOSSES, "hidden_loss": HIDDEN_LOSSES, "rationale_mode": RATIONALE_MODES, "targets": TARGETS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        checks = [
            (self.max_steps > 0 or self.epochs > 0, "--max-steps or --epochs must be positive"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.head_lr_scale > 0, f"--head-lr-scale must be positive, got {self.head_lr_scale}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.max_length >= 0, f"--max-length must be 0 or positive, got {self.max_length}"),
            (0 < self.beta < 1, f"--beta must lie strictly between 0 and 1, got {self.beta}"),
            (self.temperature > 0, f"--temperature must be positive, got {self.temperature}"),
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
             f"got --loss {self.loss} --temperature {self.temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.hidden_pairs()  # parse errors surface now
        return self


def _flag(name: str) -> str:
    return name.replace("_", "-")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_hidden_map(text: str) -> list[tuple[int, int]]:
    """`"4:8,8:16"` → [(4, 8), (8, 16)]: (student hidden_states index, stored teacher layer index)."""
    pairs: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            s, t = part.split(":")
            pair = (int(s), int(t))
        except ValueError:
            raise ConfigError(f"--hidden-map entry {part!r} is not STUDENT_LAYER:TEACHER_LAYER (e.g. 4:8)") from None
        if pair[0] < 0 or pair[1] < 0:
            raise ConfigError(f"--hidden-map entry {part!r}: layer indices must not be negative")
        if pair in pairs:
            raise ConfigError(f"--hidden-map lists {part!r} twice")
        pairs.append(pair)
    return pairs


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON file into a dict of TrainConfig fields."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(raw.decode())
        elif ext == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)
    except ImportError as e:
        raise ConfigError(f"{path}: cannot read {ext} files here ({e})") from None
    except Exception as e:  # each parser has its own error type; all mean "malformed file"
        raise ConfigError(f"{path}: not valid {ext.lstrip('.') or 'YAML'} ({type(e).__name__}: {e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check a value from a file against the field's type (a YAML `hidden_map` may be a mapping)."""
    default = FIELDS[name].default
    if name == "hidden_map" and isinstance(value, dict):
        return ",".join(f"{s}:{t}" for s, t in value.items())
    if name == "hidden_map" and isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {name} must be a {type(default).__name__}, got {value!r}")


def build_config(config_file: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the file, then the overrides (flags given on the command line; None = not given)."""
    values: dict[str, Any] = {}
    if config_file:
        for name, value in load_config_file(config_file).items():
            if name not in FIELDS:
                raise ConfigError(f"{config_file}: unknown setting {name!r}")
            values[name] = _coerce(name, value, config_file)
    for name, value in (overrides or {}).items():
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    return TrainConfig(**values).validate()
