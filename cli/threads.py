"""CPU threads for torch, chosen from the CPUs this process may really use, and set before torch starts.

On a shared machine torch's default (one OpenMP thread per core it sees, each spinning while it
waits for the others) can make a job several times slower than one thread: the threads wait on a
core someone else holds. So every command takes `--threads` (default "auto"):

  N    = that many threads, 1 to 4 per CPU this process may run on (`max_threads`);
  auto = the CPUs this process may run on (its affinity mask), capped by its cgroup CPU quota
         (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), minus the data-loader workers that need CPUs too;
         `$OMP_NUM_THREADS`, when set, is taken as the user's choice instead.

and OpenMP is told to sleep, not spin, while it waits (`OMP_WAIT_POLICY=PASSIVE`, `KMP_BLOCKTIME=0`,
unless already set): these are read once, when torch loads its OpenMP runtime, hence `prepare_environment`
at CLI start-up, before anything imports torch.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping

from potstill.store.errors import PotstillError

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
THREADS_HELP = ("CPU threads for torch: a number, or auto = the CPUs this process may use (affinity and cgroup "
                "quota){loaders}, or $OMP_NUM_THREADS when set")
# Set before torch loads OpenMP (it reads them once); a value the user exported wins.
WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
# The Hub's and transformers' own bars ("Loading weights", "Writing model shards", downloads) would
# clutter every command; potstill prints its own progress.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (`taskset`, cpusets), or all of them where that is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _v2_limit(text: str | None) -> float | None:
    """`cpu.max` is "QUOTA PERIOD" in µs, or "max PERIOD" for no limit."""
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(quota_text: str | None, period_text: str | None) -> float | None:
    """`cpu.cfs_quota_us` is -1 for no limit."""
    try:
        quota, period = int(quota_text or ""), int(period_text or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _ancestors(path: str) -> list[str]:
    """"/a/b" -> ["/a/b", "/a", "/"]: a quota anywhere above this cgroup applies too."""
    parts = [p for p in path.strip("/").split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_limit(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), the smallest along its ancestors;
    None when there is none. Reads cgroup v2 (`0::/path` → `cpu.max`) and v1 (`N:cpu,...:/path` →
    `cpu/cpu.cfs_quota_us`). Inside a container the listed path is often not mounted as such: the
    mount's own root is read then, which is the container's cgroup."""
    lines = (_read(proc_cgroup) or "").splitlines()
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            base = cgroup_root
            read = lambda d: _v2_limit(_read(os.path.join(d, "cpu.max")))  # noqa: E731
        elif "cpu" in controllers.split(","):
            base = next((os.path.join(cgroup_root, name) for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")
                         if os.path.isdir(os.path.join(cgroup_root, name))), None)
            if base is None:
                continue
            read = lambda d: _v1_limit(_read(os.path.join(d, "cpu.cfs_quota_us")),  # noqa: E731
                                       _read(os.path.join(d, "cpu.cfs_period_us")))
        else:
            continue
        dirs = [os.path.join(base, p.lstrip("/")) for p in _ancestors(path)]
        found = [limit for d in dirs if os.path.isdir(d) and (limit := read(d)) is not None]
        limits += found
    return min(limits) if limits else None


def usable_cpus(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> int:
    """CPUs this process may keep busy: its affinity mask capped by floor(cgroup quota), at least 1."""
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def max_threads() -> int:
    """The most `--threads` accepted: 4 per CPU this process may run on. More only queue on each other,
    and absurd counts (99999) make OpenMP and the tokenizers' thread pool fail to start (a Rust panic,
    then a segfault) instead of failing in one line."""
    return 4 * affinity_cpus()


def env_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """$OMP_NUM_THREADS when it is a positive whole number."""
    value = environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def auto_threads(loader_workers: int = 0, environ: Mapping[str, str] = os.environ) -> int:
    """What `--threads auto` means here: $OMP_NUM_THREADS, else usable CPUs minus loader workers (≥ 1)."""
    return env_threads(environ) or max(1, usable_cpus() - max(0, loader_workers))


def resolve_threads(value: str | int | None, loader_workers: int = 0) -> int:
    """`--threads` as given ("auto", "3", 3) -> a thread count; a bad value is one line."""
    if value is None or str(value).strip().lower() == "auto":
        threads = auto_threads(loader_workers)
        if threads > max_threads():
            raise PotstillError(f"$OMP_NUM_THREADS {threads}: too many threads for --threads auto; expected "
                                f"1 to {max_threads()} (4 per CPU this process may use)")
        return threads
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= max_threads():
        raise PotstillError(f"--threads {value!r}: expected a whole number from 1 to {max_threads()} "
                            "(4 per CPU this process may use) or auto")
    return int(text)


def threads_help(loader_workers: int = 0) -> str:
    """The help text, with what auto comes to on this machine; the data loader's workers are named only
    by a command that starts them (train's --num-workers)."""
    loaders = " minus the data loader's --num-workers" if loader_workers else ""
    return f"{THREADS_HELP.format(loaders=loaders)} (auto = {auto_threads(loader_workers)} here)."


def prepare_environment() -> None:
    """Before torch or transformers are imported: OpenMP sleeps while it waits; no library progress bars."""
    for name, value in {**WAIT_ENV, **QUIET_ENV}.items():
        os.environ.setdefault(name, value)
    quiet_library_progress()


def quiet_library_progress() -> None:
    """Turn off the Hub's and transformers' bars in modules already imported (the env var covers later ones)."""
    if sys.modules.get("huggingface_hub") is not None:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if sys.modules.get("transformers") is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def apply_threads(threads: int) -> int:
    """Use `threads` torch threads in this process and in the processes it starts; returns it."""
    prepare_environment()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)  # loader workers and other children start with the same setting
    import torch

    torch.set_num_threads(threads)
    quiet_library_progress()
    return threads


def use_threads(value: str | int | None, loader_workers: int = 0) -> int:
    """`--threads` of a command: resolve it and apply it before the command's work starts."""
    return apply_threads(resolve_threads(value, loader_workers))
