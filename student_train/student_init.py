"""`potstill student init`: a student made from its teacher, sharing its tokenizer and chat template.

The student is an ordinary transformers checkpoint (config.json, safetensors weights, the teacher's
tokenizer files and generation config) that `AutoModelForCausalLM.from_pretrained` loads and
`potstill train --student` trains directly. It is the teacher's own architecture with

- fewer layers (depth pruning): `--layers N` keeps N layers spread evenly over the teacher's, the
  first and the last included (layer round(i * (L - 1) / (N - 1)) for i = 0 .. N - 1; N = 1 keeps the
  first), or `--layers 0,3,5` keeps exactly those;
- optionally narrower (width pruning): fewer attention heads, a smaller MLP or hidden size, or any
  smaller config of the same family given as a file.

Every tensor whose shape the student shares with the teacher (embeddings, final norm, LM head, the
kept layers) is copied exactly. A narrower tensor takes the teacher's leading slice along each
dimension (the first heads, the first MLP channels, the first hidden coordinates), which keeps whole
heads when the head width stays the teacher's. Anything else keeps the initialisation the model
family gives a new model (`from_config`, seeded). Importance-based width pruning (Minitron) is not
done: the leading slice is the simple, reproducible choice, and distillation from the store recovers
what pruning loses.

The student is saved in float32 by default: `potstill train` keeps float32 master weights anyway,
every teacher dtype (bfloat16, float16, a dequantized GGUF file) converts to float32 without loss,
so the copied tensors are exactly the teacher's; `--dtype bfloat16` halves the files of a large student.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from potstill.settings import check_settings, setting
from potstill.student_train.errors import ConfigError, TrainError

REPORT_FILE = "student_init.json"
# Config entries that hold one value per layer: a depth-pruned student keeps the kept layers' values.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
WIDTHS = (  # (setting, the config's key, flag) of each width option
    ("hidden_size", "hidden_size", "--hidden-size"), ("intermediate_size", "intermediate_size", "--intermediate-size"),
    ("heads", "num_attention_heads", "--heads"), ("kv_heads", "num_key_value_heads", "--kv-heads"))
SavedDtype = Literal["float32", "bfloat16"]


@dataclass
class StudentInitConfig:
    """Every setting of `potstill student init` (flags only)."""

    teacher: str = setting("", required=True, help="Teacher: hub id, model folder or .gguf file.")
    out: str = setting("", required=True, help="Folder to write the student into (new or empty).")
    layers: str = setting("", metavar="N|I,J,...", shown_default="the --config file's layer count", help=(
        "Layers to keep: N spread evenly over the teacher's (first and last included), or the teacher "
        "layer indices, e.g. '0,3,5' (one layer: '5,')."))
    hidden_size: int = setting(0, help="Narrower hidden size (0: the teacher's).")
    intermediate_size: int = setting(0, help="Narrower MLP size (0: the teacher's).")
    heads: int = setting(0, help="Fewer attention heads (0: the teacher's).")
    kv_heads: int = setting(0, shown_default="the teacher's ratio of heads to key/value heads",
                            help="Key/value heads (grouped-query attention).")
    student_config: str = setting("", flag="--config", shown_default="none", help=(
        "A smaller config.json of the teacher's model family to use as the student's shape "
        "(instead of the width flags)."))
    dtype: SavedDtype = setting("float32", help=(
        "Weights' dtype on disk; float32 keeps the teacher's values exactly."))
    revision: str = setting("", shown_default="none", help="Hub revision of the teacher.")
    trust_remote_code: bool = setting(False, help="Allow the teacher's own modelling code.")
    seed: int = setting(0, help="Seed of the initialisation of what is not copied.")

    def validate(self) -> StudentInitConfig:
        check_settings(self, ConfigError)
        if not self.layers and not self.student_config:
            raise ConfigError("--layers is required (or a --config file that gives the student's shape)")
        parse_layers(self.layers)  # syntax now; the range once the teacher's config is read
        for name, _, flag in WIDTHS:
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag} must be positive (0: the teacher's), got {getattr(self, name)}")
        if self.student_config and self.narrower():
            raise ConfigError("--config gives the student's shape: leave out --hidden-size, --intermediate-size, "
                              "--heads and --kv-heads")
        check_out(self.out)
        return self

    def narrower(self) -> list[str]:
        """The width flags given, with their values ("--heads 2")."""
        return [f"{flag} {getattr(self, name)}" for name, _, flag in WIDTHS if getattr(self, name)]


@dataclass
class InitReport:
    """What `init_student` did, also written to the student folder as student_init.json."""

    teacher: str
    out: str
    layers: list[int]  # teacher layer kept as student layer 0, 1, ...
    teacher_layers: int
    copied: list[str]  # tensors equal to the teacher's
    sliced: list[str]  # tensors holding the teacher's leading slice
    initialised: list[str]  # tensors the model family initialised
    parameters: int
    teacher_parameters: int
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- what can be checked before anything heavy loads ------------------------------------------------
def parse_layers(text: str) -> int | list[int] | None:
    """'4' -> 4 (a count); '0,3,5' or '5,' -> [0, 3, 5] / [5] (teacher layers); '' -> None."""
    text = text.strip()
    if not text:
        return None
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ConfigError(f"--layers: keep at least one layer, got {count}")
            return count
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--layers: expected a count such as '4' or teacher layers such as '0,3,5', "
                          f"got {text!r}") from None


def spread(count: int, total: int) -> list[int]:
    """`count` of `total` layers spread evenly, the first and the last included (N = 1: the first).

    Layer i of the student is teacher layer round(i * (total - 1) / (count - 1)), halves rounded up,
    in integers; the steps are at least 1, so no layer repeats."""
    if count == 1:
        return [0]
    return [(2 * i * (total - 1) + count - 1) // (2 * (count - 1)) for i in range(count)]


def choose_layers(spec: int | list[int], total: int) -> list[int]:
    """The teacher layers to keep, in order, or one line saying what is wrong with `spec`."""
    if isinstance(spec, int):
        if spec > total:
            raise ConfigError(f"--layers {spec}: the teacher has {total} layers")
        return spread(spec, total)
    if not spec:
        raise ConfigError("--layers: no layer given")
    for layer in spec:
        if not 0 <= layer < total:
            raise ConfigError(f"--layers: layer {layer} is out of range; the teacher has layers 0..{total - 1}")
    repeated = sorted({x for x in spec if spec.count(x) > 1})
    if repeated:
        raise ConfigError(f"--layers: layer {repeated[0]} is given more than once")
    if spec != sorted(spec):
        raise ConfigError(f"--layers: give the layers in increasing order, got {','.join(map(str, spec))}")
    return list(spec)


def check_out(out: str) -> None:
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise ConfigError(f"--out {out} already exists and is not empty; give a new or empty folder")


def _text(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _head_dim(config: Any) -> int | None:
    text = _text(config)
    explicit = getattr(text, "head_dim", None)
    heads = getattr(text, "num_attention_heads", None)
    if explicit:
        return int(explicit)
    return text.hidden_size // heads if heads else None


def read_teacher_config(cfg: StudentInitConfig) -> Any:
    """The teacher's config (no weights): from a folder, the hub, or a GGUF file's header."""
    from potstill.teacher_gen.errors import describe_load_error
    from potstill.teacher_gen.gguf import pretrained_source
    from potstill.teacher_gen.model_info import check_hub_teacher

    check_hub_teacher(cfg.teacher, cfg.revision, error=TrainError)
    from transformers import AutoConfig

    source, gguf = pretrained_source(cfg.teacher)
    try:
        return AutoConfig.from_pretrained(source, revision=cfg.revision or None,
                                          trust_remote_code=cfg.trust_remote_code, **gguf)
    except Exception as e:  # missing folder, unknown architecture, remote code refused, no network...
        raise TrainError(f"teacher {cfg.teacher}: cannot load its config ({describe_load_error(e)})") from None


def student_config(cfg: StudentInitConfig, teacher_config: Any) -> tuple[Any, list[int]]:
    """(the student's config, the teacher layers it keeps), or one line naming the flag at fault."""
    import copy

    from transformers import AutoConfig

    teacher = _text(teacher_config)
    total = int(teacher.num_hidden_layers)
    if cfg.student_config:
        try:
            with open(cfg.student_config, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--config {cfg.student_config}: cannot read it ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict) or data.get("model_type") != teacher_config.model_type:
            got = data.get("model_type") if isinstance(data, dict) else None
            raise ConfigError(f"--config {cfg.student_config}: model_type {got!r} is not the teacher's "
                              f"({teacher_config.model_type!r}); give a config of the same family")
        vocab = data.get("vocab_size", teacher.vocab_size)
        if vocab != teacher.vocab_size:
            raise ConfigError(f"--config {cfg.student_config}: vocab_size {vocab} is not the teacher's "
                              f"({teacher.vocab_size}); the student shares the teacher's tokenizer")
        student = AutoConfig.for_model(**{**teacher_config.to_dict(), **data})
        wanted = parse_layers(cfg.layers)
        file_layers = int(_text(student).num_hidden_layers)
        if wanted is None:
            wanted = file_layers
        count = wanted if isinstance(wanted, int) else len(wanted)
        if count != file_layers:
            raise ConfigError(f"--layers keeps {count} layers but --config {cfg.student_config} has "
                              f"num_hidden_layers {file_layers}")
    else:
        student = copy.deepcopy(teacher_config)
        wanted = parse_layers(cfg.layers)
        _narrow(cfg, student)
    kept = choose_layers(wanted, total)  # type: ignore[arg-type]
    text = _text(student)
    text.num_hidden_layers = len(kept)
    for key in PER_LAYER_KEYS:
        values = getattr(text, key, None)
        if isinstance(values, list) and len(values) == total:
            setattr(text, key, [values[i] for i in kept])
    _check_width(cfg, teacher, text)
    _check_valid(cfg, student)
    return student, kept


def _check_valid(cfg: StudentInitConfig, config: Any) -> None:
    """The model family's own checks of a config (heads that divide the width, an even RoPE width...),
    which transformers would otherwise raise only when the student is saved."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as e:  # the family's validators raise ValueError, wrapped by huggingface_hub
        cause = e.__cause__ or e
        detail = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        where = f"--config {cfg.student_config}" if cfg.student_config else " ".join(cfg.narrower()) or "the student's config"
        raise ConfigError(f"{where}: not a valid {config.model_type} shape ({detail})") from None


def _narrow(cfg: StudentInitConfig, student: Any) -> None:
    """Apply the width flags to a copy of the teacher's config."""
    text = _text(student)
    derived_head_dim = getattr(text, "head_dim", None) in (None, text.hidden_size // text.num_attention_heads)
    ratio = text.num_attention_heads // (getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    for name, key, flag in WIDTHS:
        value = getattr(cfg, name)
        if not value:
            continue
        if not hasattr(text, key):
            raise ConfigError(f"{flag}: a {text.model_type} config has no {key}")
        setattr(text, key, value)
    if cfg.heads and not cfg.kv_heads and hasattr(text, "num_key_value_heads"):
        if cfg.heads % ratio:
            raise ConfigError(f"--heads {cfg.heads}: the teacher has {ratio} attention heads per key/value head; "
                              "give --kv-heads too")
        text.num_key_value_heads = cfg.heads // ratio
    # Fewer heads alone keep the head width, so the student's heads are whole teacher heads; a narrower
    # hidden size shrinks a head width the config derives from it (hidden size / heads).
    if derived_head_dim and cfg.hidden_size and getattr(text, "head_dim", None) is not None:
        if text.hidden_size % text.num_attention_heads:
            raise ConfigError(f"--hidden-size {text.hidden_size} is not a multiple of the "
                              f"{text.num_attention_heads} attention heads")
        text.head_dim = text.hidden_size // text.num_attention_heads


def _check_width(cfg: StudentInitConfig, teacher: Any, student: Any) -> None:
    where = f"--config {cfg.student_config}" if cfg.student_config else None
    for _, key, flag in WIDTHS:
        mine, theirs = getattr(student, key, None), getattr(teacher, key, None)
        if isinstance(mine, int) and isinstance(theirs, int) and mine > theirs:
            raise ConfigError(f"{where or flag}: {key} {mine} is larger than the teacher's ({theirs}); "
                              "a student is at most as wide as its teacher")
    heads, kv = getattr(student, "num_attention_heads", None), getattr(student, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise ConfigError(f"{where or '--kv-heads'}: {kv} key/value heads do not divide {heads} attention heads")
    if heads and getattr(student, "head_dim", None) is None and student.hidden_size % heads:
        raise ConfigError(f"{where or '--heads'}: {heads} heads do not divide the hidden size {student.hidden_size}")


# -- building the student ----------------------------------------------------------------------------
def _layer_list(model: Any, count: int) -> str:
    """The name of the model's list of decoder layers (`model.layers`, `transformer.h`, ...)."""
    import torch

    lists = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == count and name]
    if not lists:
        raise TrainError(f"{type(model).__name__}: no list of {count} decoder layers found; cannot prune its depth")
    return min(lists, key=len)  # the outermost one (layers inside a layer have longer names)


def transfer(teacher: Any, student: Any, kept: list[int]) -> tuple[list[str], list[str], list[str]]:
    """Copy the teacher's tensors into the student: whole where the shapes agree, the leading slice
    where the student's are smaller. Returns the names (copied, sliced, initialised)."""
    import torch

    prefix = _layer_list(teacher, len(list(_layers_of(teacher))))
    teacher_state = teacher.state_dict()
    copied, sliced, initialised = [], [], []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            source = _teacher_name(name, prefix, kept)
            theirs = teacher_state.get(source)
            if theirs is None or theirs.dim() != tensor.dim():
                initialised.append(name)
            elif theirs.shape == tensor.shape:
                tensor.copy_(theirs)
                copied.append(name)
            elif all(m <= t for m, t in zip(tensor.shape, theirs.shape, strict=True)):
                tensor.copy_(theirs[tuple(slice(0, m) for m in tensor.shape)])
                sliced.append(name)
            else:
                initialised.append(name)
    return copied, sliced, initialised


def _layers_of(model: Any) -> Any:
    return range(int(_text(model.config).num_hidden_layers))


def _teacher_name(name: str, prefix: str, kept: list[int]) -> str:
    """The teacher's name of a student tensor: student layer j is teacher layer kept[j]."""
    head = prefix + "."
    if not name.startswith(head):
        return name
    index, _, rest = name[len(head):].partition(".")
    if not index.isdigit() or int(index) >= len(kept):
        return name
    return f"{head}{kept[int(index)]}.{rest}"


def init_student(cfg: StudentInitConfig, log: Any = None) -> InitReport:
    """Write the student `cfg` asks for; every user mistake is one `ConfigError` / `TrainError` line,
    raised before the teacher's weights load where the config alone tells."""
    cfg.validate()
    teacher_config = read_teacher_config(cfg)
    config, kept = student_config(cfg, teacher_config)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.teacher_gen.errors import describe_load_error
    from potstill.teacher_gen.gguf import pretrained_source

    say = log or (lambda _message: None)
    source, gguf = pretrained_source(cfg.teacher)
    revision = cfg.revision or None
    say(f"loading the teacher {cfg.teacher}" + (" (dequantizing the GGUF file)" if gguf else ""))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=cfg.trust_remote_code,
                                                  **gguf)
        # The config read above, not read again: a GGUF file's header is parsed whole for it (seconds).
        teacher = AutoModelForCausalLM.from_pretrained(source, config=teacher_config, revision=revision,
                                                       dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                                                       **gguf)
    except Exception as e:  # unknown architecture, damaged weights, gguf package missing...
        raise TrainError(f"teacher {cfg.teacher}: cannot load it ({describe_load_error(e)})") from None
    torch.manual_seed(cfg.seed)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    copied, sliced, initialised = transfer(teacher, student, kept)
    if not (cfg.student_config or cfg.narrower()) and (sliced or initialised):  # same width: every tensor has a teacher's to copy
        raise TrainError(f"{type(student).__name__}: tensors {(sliced + initialised)[:3]} could not be copied "
                         "from the teacher; its layout is not one potstill can prune")
    generation = getattr(teacher, "generation_config", None)  # its end-of-turn tokens, sampling defaults
    report = InitReport(teacher=cfg.teacher, out=cfg.out, layers=kept, teacher_layers=len(_layers_of(teacher)),
                        copied=copied, sliced=sliced, initialised=initialised,
                        parameters=sum(p.numel() for p in student.parameters()),
                        teacher_parameters=sum(p.numel() for p in teacher.parameters()), dtype=cfg.dtype)
    del teacher
    if generation is not None:
        student.generation_config = generation
    student.to(getattr(torch, cfg.dtype))
    _save(cfg.out, student, tokenizer, report)
    return report


def _save(out: str, student: Any, tokenizer: Any, report: InitReport) -> None:
    """The student's folder, whole or not at all."""
    from potstill.folders import write_folder

    def fill(folder: str) -> None:
        student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, REPORT_FILE), "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)

    write_folder(out, fill, prefix=".student-init-")
