"""Turning a `SourceItem` into token ids the teacher reads, with the length checks.

Prompt text is tokenized with the tokenizer's special tokens (BOS when it adds one); chat
messages are rendered with the tokenizer's chat template, whose text already holds them. A given
completion is tokenized on its own and appended, so the prompt/completion boundary is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.errors import GenerateError, InputError
from potstill.teacher_gen.prompts import SourceItem, text_limit, utf8_length
from potstill.teacher_gen.rationale import apply_template


@dataclass
class Encoded:
    """An item ready for the teacher.

    Score mode: `completion_ids` is what is appended to the prompt (may be empty with
    --score-prompt). Generate mode: `completion_ids` is None and `max_new_tokens` is how many
    tokens this prompt may get (fewer than asked only with --truncate near the context end).
    """

    item: SourceItem
    prompt_ids: np.ndarray
    completion_ids: np.ndarray | None = None
    completion_text: str | None = None  # the completion scored (the given one, or the chat's last answer)
    max_new_tokens: int = 0
    truncated: bool = False


def context_length(model_config: Any, tokenizer: Any) -> int | None:
    """The teacher's context length from its config (or its tokenizer), None when unknown."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10_000_000:  # HF uses ~1e30 for "no limit"
        return value
    return None


def _render_messages(messages: list[dict[str, Any]], tokenizer: Any, item: SourceItem) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise GenerateError(
            f"line {item.line}: the record has chat messages but the teacher's tokenizer has no chat template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_item(item: SourceItem, tokenizer: Any, config: GenerateConfig, max_length: int | None) -> Encoded | InputError:
    """Tokenize one item for `config.mode`; an `InputError` says why it cannot be used. Tokenizers
    and chat templates raise their own errors on odd input: each becomes this item's `InputError`."""
    try:
        return _encode_item(item, tokenizer, config, max_length)
    except GenerateError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return InputError(item.line, item.id, f"cannot be tokenized ({type(e).__name__}: {first})")


def _encode_item(item: SourceItem, tokenizer: Any, config: GenerateConfig, max_length: int | None) -> Encoded | InputError:

    def bad(reason: str) -> InputError:
        return InputError(item.line, item.id, reason)

    completion_text = item.completion
    if item.messages is not None:
        messages = [dict(m) for m in item.messages]
        if messages[-1]["role"] == "assistant":
            # The conversation ends with the answer: score it (when no completion is given),
            # or let the teacher write its own (generate mode).
            last = messages.pop()
            if config.mode == "score" and completion_text is None:
                completion_text = last["content"]
            if not messages:
                return bad("messages hold only an assistant turn, nothing to prompt with")
        if config.rationale:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if users:
                m = messages[users[-1]]
                m["content"] = apply_template(config.rationale_template, m["content"])
        try:
            text = _render_messages(messages, tokenizer, item)
        except GenerateError:
            raise
        except Exception as e:  # chat templates raise their own errors (e.g. roles must alternate)
            return bad(f"chat template failed: {e}")
    else:
        text = item.prompt or ""
        if config.rationale:
            text = apply_template(config.rationale_template, text)
    limit = text_limit(max_length)
    if limit is not None and utf8_length(text) > limit:
        if not (config.truncate and config.mode == "score" and config.score_prompt):  # else it is cut anyway
            return bad(_too_long(utf8_length(text), max_length, limit))
        text = text[:limit]  # at least `limit` bytes: still more than the context, which --truncate cuts
    prompt_ids = _ids(tokenizer, text, special=item.messages is None)
    if not prompt_ids:
        return bad("prompt encodes to no tokens")

    if config.mode == "generate":
        return _encode_generate(item, prompt_ids, config, max_length, bad)
    return _encode_score(item, prompt_ids, completion_text, tokenizer, config, max_length, bad)


def _encode_generate(item: SourceItem, prompt_ids: list[int], config: GenerateConfig, max_length: int | None,
                     bad: Callable[[str], InputError]) -> Encoded | InputError:
    room = config.max_new_tokens if max_length is None else max_length - len(prompt_ids)
    if room < 1:
        return bad(f"prompt of {len(prompt_ids)} tokens fills the teacher's context ({max_length})")
    if room < config.max_new_tokens and not config.truncate:
        return bad(
            f"prompt of {len(prompt_ids)} tokens + --max-new-tokens {config.max_new_tokens} exceeds the "
            f"teacher's context ({max_length}); use --truncate to generate fewer tokens"
        )
    return Encoded(
        item,
        np.asarray(prompt_ids, dtype=np.int32),
        max_new_tokens=min(room, config.max_new_tokens),
        truncated=room < config.max_new_tokens,
    )


def _encode_score(item: SourceItem, prompt_ids: list[int], completion_text: str | None, tokenizer: Any,
                  config: GenerateConfig, max_length: int | None,
                  bad: Callable[[str], InputError]) -> Encoded | InputError:
    if completion_text is not None:
        limit = text_limit(max_length)
        to_tokenize = completion_text
        if limit is not None and utf8_length(completion_text) > limit:  # measured before it is tokenized
            if not config.truncate:
                return bad(_too_long(utf8_length(completion_text), max_length, limit, "completion"))
            to_tokenize = completion_text[:limit]  # still more than the context: --truncate cuts the tokens
        completion_ids = _ids(tokenizer, to_tokenize, special=False)
        if config.append_eos and tokenizer.eos_token_id is not None:
            completion_ids.append(int(tokenizer.eos_token_id))
        if not completion_ids:
            return bad("empty completion")
    elif config.score_prompt:
        completion_ids = []
        if len(prompt_ids) < 2:
            return bad("prompt has a single token: nothing to score")
    else:
        return bad("no completion to score (give a completion field, or --score-prompt to score the prompt)")

    n = len(prompt_ids) + len(completion_ids)
    truncated = False
    if max_length is not None and n > max_length:
        if not config.truncate:
            return bad(f"{n} tokens, longer than the teacher's context ({max_length}); use --truncate to cut it")
        score_start = 1 if config.score_prompt else len(prompt_ids)
        if score_start >= max_length:
            return bad(f"prompt of {len(prompt_ids)} tokens fills the teacher's context ({max_length})")
        keep_prompt = min(len(prompt_ids), max_length)
        prompt_ids = prompt_ids[:keep_prompt]
        completion_ids = completion_ids[: max_length - keep_prompt]
        truncated = True
    return Encoded(
        item,
        np.asarray(prompt_ids, dtype=np.int32),
        completion_ids=np.asarray(completion_ids, dtype=np.int32),
        completion_text=completion_text,
        truncated=truncated,
    )


def _too_long(size: int, max_length: int | None, limit: int, what: str = "text") -> str:
    return (f"too long: {size:,} bytes of {what} cannot fit the teacher's context of {max_length} tokens "
            f"(at most {limit:,} bytes); skipped without tokenizing")
