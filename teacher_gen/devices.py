"""Which device a teacher runs on: `--device`, and each process's own GPU under a launcher.

`torchrun --nproc-per-node N` (and accelerate, deepspeed, ...) start N processes on a box and give
each one `LOCAL_RANK` = 0 … N−1. Every process sees every GPU, so a plain `cuda` would put all N on
GPU 0: under `LOCAL_RANK`, `--device auto` and a bare `--device cuda` mean `cuda:<LOCAL_RANK>`. An
explicit `cuda:K` is kept as given. The HF backend places the model there; vLLM, which picks its
GPUs itself from `CUDA_VISIBLE_DEVICES`, gets that variable narrowed to the process's own GPUs
before its engine starts (`vllm_visible_devices`).

The functions here are pure (the device count and the environment are arguments), so the rules
are tested without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from potstill.teacher_gen.errors import GenerateError


def local_rank(environ: Mapping[str, str]) -> int | None:
    """This process's index on its box, from `LOCAL_RANK` (set by torchrun); None when unset."""
    value = environ.get("LOCAL_RANK", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise GenerateError(f"LOCAL_RANK={value!r} is not a process index (0, 1, ...)")
    return int(value)


def _visible(environ: Mapping[str, str]) -> str:
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={listed})" if listed is not None else ""


def resolve_device(flag: str, cuda_count: int, environ: Mapping[str, str]) -> str:
    """The torch device `--device flag` names in a process that sees `cuda_count` CUDA devices.

    `auto`: `cuda` when there is one, else `cpu`. Under `LOCAL_RANK`, `auto` and a bare `cuda`
    on CUDA become `cuda:<LOCAL_RANK>`, which must be one of the visible devices; on CPU the rank
    changes nothing.
    """
    if flag == "auto":
        flag = "cuda" if cuda_count > 0 else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise GenerateError(f"--device {flag!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type != "cuda":
        return str(device)
    if cuda_count == 0:
        raise GenerateError(f"--device {flag}: CUDA is not available on this machine")
    if device.index is not None:
        if device.index >= cuda_count:
            raise GenerateError(f"--device {flag}: only {cuda_count} CUDA device(s) are visible{_visible(environ)}")
        return str(device)
    rank = local_rank(environ)
    if rank is None:
        return "cuda"
    if rank >= cuda_count:
        raise GenerateError(
            f"LOCAL_RANK={rank} but only {cuda_count} CUDA device(s) are visible{_visible(environ)}: "
            f"start at most {cuda_count} processes per node"
        )
    return f"cuda:{rank}"


def vllm_visible_devices(flag: str, cuda_count: int, environ: Mapping[str, str],
                         tensor_parallel: int = 1) -> str | None:
    """The `CUDA_VISIBLE_DEVICES` a vLLM engine of this process gets, or None to leave it as it is.

    vLLM takes the first `tensor_parallel` visible GPUs. The process's own GPUs are
    `tensor_parallel` consecutive ones from `cuda:K` (`--device cuda:K`, or K = LOCAL_RANK ·
    tensor_parallel under a launcher), named as the variable already names them when it is set.
    """
    if cuda_count == 0:
        return None
    rank = local_rank(environ)
    if flag in ("auto", "cuda"):
        if rank is None:
            return None
        first, who = rank * tensor_parallel, f"LOCAL_RANK={rank}"
    else:
        device = torch.device(resolve_device(flag, cuda_count, environ))
        if device.type != "cuda":
            return None
        first, who = device.index or 0, f"--device {flag}"
    if first + tensor_parallel > cuda_count:
        raise GenerateError(
            f"{who} with --tensor-parallel-size {tensor_parallel} needs GPUs {first}..{first + tensor_parallel - 1}, "
            f"but only {cuda_count} CUDA device(s) are visible{_visible(environ)}"
        )
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in listed.split(",")] if listed else [str(i) for i in range(cuda_count)]
    return ",".join(names[first : first + tensor_parallel])


def pick_device(flag: str) -> torch.device:
    """`resolve_device` for this process: its CUDA device count and environment."""
    return torch.device(resolve_device(flag, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                                       os.environ))
