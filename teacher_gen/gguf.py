"""GGUF teachers: `--teacher path/to/model.gguf` loads a single-file GGUF checkpoint directly.

transformers reads a GGUF file (with the `gguf` package) as `from_pretrained(folder,
gguf_file=name)`: the config, the tokenizer and the weights, dequantized to a plain float model.
`pretrained_source` turns a teacher or tokenizer argument into those `from_pretrained` arguments,
so every loader (config, tokenizer, model) reads a GGUF file the same way.

A GGUF file has no config.json to hash, so the store identifies such a teacher by a hash of the
parsed config together with the sha256 of the file itself (`gguf_identity`).

`convert_gguf` writes a GGUF checkpoint out as an ordinary `save_pretrained` folder (float
weights, tokenizer, generation config), for engines that cannot read GGUF (vLLM on CPU) and for
students that start from the teacher's tokenizer.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from potstill.teacher_gen.errors import GenerateError

GGUF_SUFFIX = ".gguf"
_HASH_BLOCK = 1 << 22


def is_gguf(name: str | None) -> bool:
    return bool(name) and str(name).lower().endswith(GGUF_SUFFIX)


def pretrained_source(name: str) -> tuple[str, dict[str, Any]]:
    """(what to pass to `from_pretrained`, extra keyword arguments) for a model or tokenizer argument."""
    if not is_gguf(name):
        return name, {}
    if not os.path.isfile(name):
        raise GenerateError(f"GGUF file {name} does not exist")
    folder, file = os.path.split(os.path.abspath(name))
    return folder, {"gguf_file": file}


# GGUF metadata value types (gguf's GGUFValueType): fixed widths for the scalars, 8 = string, 9 = array.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def metadata_string(path: str, key: str) -> str | None:
    """One string entry of a GGUF file's metadata (`general.license`), None when the file has none.

    Reads the header only as far as the key, skipping the values before it: the `gguf` package's
    reader decodes every entry, the tokenizer's vocabulary and merges included (seconds for one key).
    Raises ValueError on a file that is not GGUF v2/v3.
    """
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        magic, version, _tensors, count = struct.unpack_from("<4sIQQ", blob, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path} is not a GGUF v2/v3 file")
        pos = 24

        def string(at: int) -> tuple[bytes, int]:
            (size,) = struct.unpack_from("<Q", blob, at)
            return blob[at + 8:at + 8 + size], at + 8 + size

        def skip(kind: int, at: int) -> int:
            if kind in _SCALAR:
                return at + struct.calcsize(_SCALAR[kind])
            if kind == _STRING:
                return string(at)[1]
            if kind == _ARRAY:
                item, length = struct.unpack_from("<IQ", blob, at)
                at += 12
                if item in _SCALAR:
                    return at + length * struct.calcsize(_SCALAR[item])
                for _ in range(length):
                    at = skip(item, at)
                return at
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        for _ in range(count):
            name, pos = string(pos)
            (kind,) = struct.unpack_from("<I", blob, pos)
            pos += 4
            if name.decode("utf-8", "replace") == key:
                return string(pos)[0].decode("utf-8", "replace") if kind == _STRING else None
            pos = skip(kind, pos)
    return None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def gguf_identity(path: str, parsed_config: dict[str, Any]) -> dict[str, Any]:
    """What `teacher.config_hash` hashes for a GGUF teacher: its parsed config and the file's sha256.

    Keys that depend on the transformers version that parsed the file, not on the model, are left
    out, so that two installations agree on the identity of one file.
    """
    config = {k: v for k, v in parsed_config.items() if k not in ("transformers_version", "_name_or_path")}
    return {"gguf_sha256": file_sha256(path), "config": config}


def convert_gguf(path: str, out_dir: str, dtype: str = "float32") -> str:
    """Dequantize a GGUF checkpoint into a `save_pretrained` folder (weights, config, tokenizer).

    transformers refuses to save a model loaded from GGUF ("not serializable"), so a plain model is
    built from the parsed config and given the dequantized weights. The folder appears whole or not
    at all: it is written next to `out_dir` and renamed into place.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, kwargs = pretrained_source(path)
    torch_dtype = getattr(torch, dtype)
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch_dtype, **kwargs)
    except Exception as e:  # gguf missing, unknown architecture, damaged file...
        raise GenerateError(f"GGUF file {path}: cannot load it ({_first_line(e)})") from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise GenerateError(f"GGUF file {path}: its weights do not fit a {type(model).__name__} "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.generation_config = loaded.generation_config
    from potstill.folders import write_folder

    def fill(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder(out_dir, fill, prefix=".gguf-convert-")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """`python -m potstill.teacher_gen.gguf MODEL.gguf FOLDER [--dtype float32]`: convert, one line on error."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m potstill.teacher_gen.gguf", description=main.__doc__)
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("folder", help="the model folder to write (must not exist)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.folder):
            raise GenerateError(f"{args.folder} already exists; give a new folder")
        convert_gguf(args.gguf, args.folder, args.dtype)
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
