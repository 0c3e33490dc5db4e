"""The student side: loading a student, checking it against a store, and `DistillModel`, the module
the Trainer trains (the student plus the learned projections of the hidden-state loss)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch
from torch import nn

from potstill.store import Store, tokenizer_fingerprint
from potstill.student_train.errors import CompatibilityError, TrainError

PROJECTIONS_FILE = "projections.safetensors"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


# -- loading ---------------------------------------------------------------------------------------
def _has_weights(folder: str) -> bool:
    files = [os.path.basename(f) for p in WEIGHT_PATTERNS for f in glob.glob(os.path.join(folder, p))]
    return any(f != PROJECTIONS_FILE for f in files)


def load_student(path: str, *, trust_remote_code: bool = False) -> Any:
    """A causal LM in float32 (mixed precision comes from autocast): from a model folder with weights,
    or built with random weights from a config (a folder holding only config.json, or a .json file).
    Seed the RNG before calling for a reproducible random init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.exists(path):
        raise TrainError(f"student {path} does not exist (a model folder or a config .json)")
    try:
        if os.path.isdir(path) and _has_weights(path):
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise TrainError(f"student folder {path} holds neither weights nor a config.json")
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        else:
            with open(path) as f:
                data = json.load(f)
            if "model_type" not in data:
                raise TrainError(f"student config {path} has no model_type")
            config = AutoConfig.for_model(**data)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except TrainError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise TrainError(f"cannot load student {path}: {str(e).splitlines()[0]}") from None


def load_tokenizer(student_path: str, store: Store) -> tuple[Any, str]:
    """The student's own tokenizer when its folder has one, else the store's. Returns (tokenizer, source)."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if os.path.isdir(student_path) and any(os.path.isfile(os.path.join(student_path, n)) for n in names):
        return AutoTokenizer.from_pretrained(student_path), student_path
    return AutoTokenizer.from_pretrained(store.tokenizer_dir), f"{store.url}/tokenizer"


# -- compatibility ---------------------------------------------------------------------------------
def check_tokenizer(tokenizer: Any, store: Store, source: str, hint: str = "") -> None:
    """Fail in one line, saying what differs (and `hint`, what to do), unless the tokenizer is the store's
    (format §7)."""
    mine = tokenizer_fingerprint(tokenizer)
    stored = store.manifest.tokenizer
    if mine.fingerprint == stored.fingerprint:
        return
    diffs = []
    if mine.vocab_size != stored.vocab_size:
        diffs.append(f"vocabulary size {mine.vocab_size} vs {stored.vocab_size}")
    for name in sorted(set(mine.special_tokens) | set(stored.special_tokens)):
        a, b = mine.special_tokens.get(name), stored.special_tokens.get(name)
        if a != b:
            diffs.append(f"{name} {a} vs {b}")
    if not diffs:
        diffs.append(_vocab_difference(tokenizer, store))
    raise CompatibilityError(
        f"student tokenizer ({source}) does not match the store's tokenizer ({store.url}): " + "; ".join(diffs) + hint
    )


def _vocab_difference(tokenizer: Any, store: Store) -> str:
    """Same size and special ids: name the first token string that differs, if the store's tokenizer loads."""
    try:
        from transformers import AutoTokenizer

        theirs = {i: t for t, i in AutoTokenizer.from_pretrained(store.tokenizer_dir).get_vocab().items()}
    except Exception:  # the stored files may be unreadable here; the fingerprints still differ
        return "same size and special ids, but the vocabularies differ (fingerprints differ)"
    mine = {i: t for t, i in tokenizer.get_vocab().items()}
    differing = sorted(i for i in set(mine) | set(theirs) if mine.get(i) != theirs.get(i))
    if not differing:
        return "same vocabulary, but added/special token flags differ"
    first = differing[0]
    return f"{len(differing)} token strings differ (first: id {first} is {mine.get(first)!r} vs {theirs.get(first)!r})"


def output_rows(student: Any) -> int:
    return int(student.get_output_embeddings().weight.shape[0])


def check_vocab(student: Any, store: Store) -> int:
    """The student must have a logit for every token id of the store's tokenizer."""
    rows, needed = output_rows(student), store.manifest.tokenizer.vocab_size
    if rows < needed:
        raise CompatibilityError(
            f"student has {rows} output logits but the store's tokenizer has {needed} tokens: "
            "the student's vocabulary must cover the store's ids"
        )
    return rows


def check_hidden_map(student: Any, store: Store, pairs: list[tuple[int, int]]) -> None:
    layers = int(student.config.get_text_config().num_hidden_layers)
    stored = {layer.index for layer in store.manifest.hidden.layers}
    for s, t in pairs:
        if s > layers:
            raise CompatibilityError(f"--hidden-map {s}:{t}: the student has hidden_states 0..{layers}, not {s}")
        if t not in stored:
            raise CompatibilityError(
                f"--hidden-map {s}:{t}: the store holds teacher layers {sorted(stored) or 'none'}, not {t}"
            )


# -- the trained module ----------------------------------------------------------------------------
def head_logits(student: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states, with the config's logit transforms (Gemma soft-capping,
    Cohere logit_scale). `check_head` verifies this equals the model's own logits."""
    logits = student.get_output_embeddings()(hidden)
    config = student.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def check_weights(student: Any, source: str) -> None:
    """Refuse a student that already holds NaN or infinite weights: training it could only save garbage."""
    for name, param in student.named_parameters():
        if not torch.isfinite(param).all():
            raise CompatibilityError(f"student {source}: weight {name} holds NaN or infinite values")


@torch.no_grad()
def check_head(student: Any, vocab_size: int) -> None:
    """Refuse a student whose logits `head_logits` does not reproduce (an unusual custom head)."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    ids = torch.arange(min(8, vocab_size), device=device).unsqueeze(0)
    try:
        full = student(input_ids=ids, use_cache=False).logits.float()
        base = student.base_model(input_ids=ids, use_cache=False).last_hidden_state
        mine = head_logits(student, base).float()
    except (AttributeError, TypeError):  # no separate body and head (base_model is the model itself)
        mine = None
    student.train(was_training)
    if mine is None or not torch.allclose(full, mine, atol=1e-4, rtol=1e-4):
        raise CompatibilityError(
            f"student {type(student).__name__}: its logits are not LM head(last hidden state); "
            "potstill cannot compute them at the scored positions only"
        )


class DistillModel(nn.Module):
    """The student plus one linear projection per hidden-map pair whose widths differ.

    `forward` runs the student's body once, applies the LM head only at the trained positions
    (never a [batch, seq, vocab] tensor) and returns what the losses need. Everything trained is
    inside this module, so DDP/FSDP wrap and synchronise it as one.
    """

    def __init__(
        self,
        student: Any,
        hidden_pairs: list[tuple[int, int]] | None = None,
        teacher_widths: dict[int, int] | None = None,
        project: bool = True,
    ) -> None:
        super().__init__()
        self.student = student
        self.hidden_pairs = list(hidden_pairs or [])
        width = int(student.config.get_text_config().hidden_size)
        self.projections = nn.ModuleDict()
        if project:
            for s, t in self.hidden_pairs:
                teacher_width = (teacher_widths or {})[t]
                if teacher_width != width:
                    self.projections[projection_name(s, t)] = nn.Linear(width, teacher_width, bias=False)
        self._no_split_modules = getattr(student, "_no_split_modules", None)  # FSDP auto-wrap

    @property
    def student_layers(self) -> list[int]:
        return sorted({s for s, _ in self.hidden_pairs})

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pos_batch: torch.Tensor,
        pos_index: torch.Tensor,
        with_hidden: bool = False,
    ) -> dict[str, Any]:
        out = self.student.base_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_hidden, use_cache=False
        )
        logits = head_logits(self.student, out.last_hidden_state[pos_batch, pos_index])
        result: dict[str, Any] = {"logits": logits}
        if with_hidden:
            states = out.hidden_states
            result["hidden"] = {s: states[s] for s in self.student_layers}
            result["projected"] = {
                (s, t): self.projections[projection_name(s, t)](states[s])
                if projection_name(s, t) in self.projections
                else states[s]
                for s, t in self.hidden_pairs
            }
        return result

    # -- saving ---------------------------------------------------------------------------------
    def save(self, folder: str, tokenizer: Any = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The student with save_pretrained (+ tokenizer), the projections beside it as safetensors."""
        from safetensors.torch import save_file

        student_state = None
        if state_dict is not None:  # FSDP/DeepSpeed hand over a gathered state dict
            student_state = {k[len("student.") :]: v for k, v in state_dict.items() if k.startswith("student.")}
        os.makedirs(folder, exist_ok=True)
        self.student.save_pretrained(folder, state_dict=student_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if len(self.projections):
            tensors = {
                f"{name}.weight": (state_dict or {}).get(f"projections.{name}.weight", layer.weight).detach().cpu().contiguous()
                for name, layer in self.projections.items()
            }
            pairs = json.dumps([[s, t] for s, t in self.hidden_pairs if projection_name(s, t) in self.projections])
            save_file(tensors, os.path.join(folder, PROJECTIONS_FILE), metadata={"format": "pt", "pairs": pairs})

    def load(self, folder: str) -> None:
        """Load weights saved by `save` (a checkpoint) into this module, in place."""
        from safetensors.torch import load_file

        saved = type(self.student).from_pretrained(folder, dtype=torch.float32)
        self.student.load_state_dict(saved.state_dict())
        del saved
        if len(self.projections):
            path = os.path.join(folder, PROJECTIONS_FILE)
            if not os.path.isfile(path):
                raise TrainError(f"{folder}: checkpoint has no {PROJECTIONS_FILE} for the hidden-state projections")
            tensors = load_file(path)
            for name, layer in self.projections.items():
                layer.weight.data.copy_(tensors[f"{name}.weight"])


def projection_name(student_layer: int, teacher_layer: int) -> str:
    return f"student{student_layer}_to_teacher{teacher_layer}"
