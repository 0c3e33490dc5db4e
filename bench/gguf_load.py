"""What loading a GGUF teacher costs in header parses: SmolLM2-135M-Instruct as its Q4_1 file.

transformers' GGUF loader (the `gguf` package's reader) decodes the whole header, the tokenizer's
49,152 tokens and merges included, on every call: for the config, for the tokenizer's class and for
the weights. Side by side, `--reps` times each, one thread:

- the model load as `from_pretrained(file)` (it reads the config again) and as `from_pretrained(file,
  config=...)` with the config already read (what `potstill generate` and `potstill student init` do);
- the teacher's `general.license`, as the `gguf` package's reader finds it and as
  `teacher_gen.gguf.metadata_string` does (walking the header only up to the key).

    python bench/gguf_load.py            # ~1 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    import torch
    from common import fetch_real_teacher
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    from potstill.teacher_gen.gguf import metadata_string, pretrained_source

    torch.set_num_threads(1)
    path = fetch_real_teacher().gguf
    source, gguf = pretrained_source(path)
    config = AutoConfig.from_pretrained(source, **gguf)
    for rep in range(args.reps):
        reread, first = timed(lambda: AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **gguf))
        given, second = timed(lambda: AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=torch.float32, **gguf))
        same = all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                     strict=True))
        del first, second
        reader, field = timed(lambda: GGUFReader(path).fields["general.license"])
        walk, licence = timed(lambda: metadata_string(path, "general.license"))
        assert licence == bytes(field.parts[field.data[0]]).decode()
        print(f"rep {rep}: model load {reread:.2f} s reading the config again, {given:.2f} s given it "
              f"(same weights: {same}); licence {reader:.2f} s by GGUFReader, {walk * 1000:.2f} ms by the "
              f"header walk ({licence})", flush=True)


if __name__ == "__main__":
    main()
