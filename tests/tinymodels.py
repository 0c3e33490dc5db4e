"""Tiny real models for tests: a tokenizer trained locally with `tokenizers` and a random-weight
Llama, both saved to a folder and loaded back with `from_pretrained`, exactly as a user's would be."""

from __future__ import annotations

import os

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a teacher writes what it knows into a store",
    "students learn from the store without the teacher",
    "what is 12 plus 35 ? the answer is 47",
    "let us think step by step . first add the ones , then the tens",
    "hello world , this is a tiny corpus for a tiny tokenizer",
    "knowledge distillation transfers soft targets from teacher to student",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(path: str, vocab_size: int = 384, corpus: list[str] | None = None):
    """Train a small byte-level BPE tokenizer and save it as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def build_llama(path: str, vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
                max_positions: int = 256, tokenizer_dir: str | None = None):
    """A random-weight Llama saved with save_pretrained (plus the tokenizer, when given)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than the default init, so top-k targets are not near-uniform
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return model
