"""Run the potstill command line and SIGKILL it at one precise moment: a *kill point*.

    python bench/killpoints.py POINT N -- generate --teacher ... --store ...

runs `potstill generate ...` and kills its whole process group (`kill -9`, loader workers included)
the N-th time (1-based) the process reaches POINT. A kill from outside lands wherever the process
happens to be, mostly in model code; a kill point lands exactly where a crash is most harmful: in the
middle of a shard, between a commit record's temporary file and its link, in the middle of a
checkpoint. Nothing of potstill is replaced: the hooks only count calls of the real functions and
kill before or after the chosen one. A "torn" point emulates a kill *during* a plain (non-atomic)
file write: it writes the first half of the bytes the real call would write, then kills.

The process must be started in its own session (`start_new_session=True`), so that the kill takes
its children with it, as a job scheduler's kill does.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def die() -> None:
    """kill -9 of this process group (of this process alone when it leads no group)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class Counter:
    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.calls = 0

    def hit(self) -> bool:
        self.calls += 1
        return self.calls == self.nth


def _wrap(owner: Any, name: str, counter: Counter, when: str, applies: Callable[..., bool] | None = None) -> None:
    """Kill `before` or `after` the N-th call of `owner.name` (among the calls `applies` accepts)."""
    real = getattr(owner, name)

    @functools.wraps(real)
    def hooked(*args: Any, **kwargs: Any) -> Any:
        if applies is not None and not applies(*args, **kwargs):
            return real(*args, **kwargs)
        fire = counter.hit()
        if fire and when == "before":
            die()
        result = real(*args, **kwargs)
        if fire:
            die()
        return result

    setattr(owner, name, hooked)


def _in_folder(folder: str) -> Callable[..., bool]:
    """Accepts calls whose first argument is a path directly inside a folder named `folder`."""
    return lambda src, *a, **k: os.path.basename(os.path.dirname(str(src))) == folder


def _is_temp(src: Any, *a: Any, **k: Any) -> bool:
    name = os.path.basename(str(src))
    return name.startswith(".") and name.endswith(".tmp")


def _torn_write(path: str, data: bytes | str) -> None:
    """What a kill during a plain `open(path, "w").write(data)` leaves: the first half, then death."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    die()


# -- the points -------------------------------------------------------------------------------------
def _hidden_chunk(c: Counter) -> None:  # generate: mid-shard, some hidden-state chunks on disk
    from potstill.store import hidden

    _wrap(hidden.HiddenShardWriter, "_write_chunk", c, "after")


def _shard_files(c: Counter) -> None:  # generate: records.arrow and the Zarr group whole, no commit yet
    from potstill.store import hidden

    _wrap(hidden.HiddenShardWriter, "finish", c, "after")


def _commit_record(c: Counter) -> None:  # generate, copy: the commit record's temporary file is whole, not linked
    _wrap(os, "link", c, "before", lambda src, dst, *a, **k: _is_temp(src) and _in_folder("commits")(src))


def _after_commit(c: Counter) -> None:  # generate, copy: just after a commit record is linked in
    _wrap(os, "link", c, "after", lambda src, dst, *a, **k: _is_temp(src) and _in_folder("commits")(src))


def _lease(c: Counter) -> None:  # any writer: between a lease's temporary file and its link (first) or rename
    in_writers = lambda src, dst, *a, **k: _is_temp(src) and _in_folder("writers")(src)  # noqa: E731
    _wrap(os, "link", c, "before", in_writers)
    _wrap(os, "replace", c, "before", in_writers)


def _manifest(c: Counter) -> None:  # a store being created (generate, copy): the manifest's temporary file, not linked
    _wrap(os, "link", c, "before", lambda src, dst, *a, **k: _is_temp(src) and os.path.basename(dst) == "manifest.json")


def _copy_file(c: Counter) -> None:  # store copy: after the N-th data file of a shard is copied
    from potstill.store import copy

    _wrap(copy, "_copy_file", c, "after")


def _copy_file_torn(c: Counter) -> None:  # store copy: during the N-th file copy, half of it written
    from potstill.store import copy
    from potstill.store.fs import join

    real = copy._copy_file

    def torn(src: Any, entry: Any, fs: Any, root: str, where: str) -> None:
        if not c.hit():
            return real(src, entry, fs, root, where)
        data = src.fs.cat_file(join(src.root, entry.path))
        target = join(root, entry.path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _torn_write(target, data)

    copy._copy_file = torn


def _train_step(c: Counter) -> None:  # train: after the N-th micro-batch's backward, before its optimizer step
    from potstill.student_train import trainer

    _wrap(trainer.DistillTrainer, "training_step", c, "after")


def _checkpoint_model(c: Counter) -> None:  # train: the N-th checkpoint holds the student, nothing else yet
    from potstill.student_train import model

    _wrap(model.DistillModel, "save", c, "after", lambda self, folder, *a, **k: "checkpoint-" in str(folder))


def _checkpoint_optimizer(c: Counter) -> None:  # train: the N-th optimizer.pt written, RNG and trainer state not
    import torch

    _wrap(torch, "save", c, "after", lambda obj, f, *a, **k: os.path.basename(str(f)) == "optimizer.pt")


def _checkpoint_state_torn(c: Counter) -> None:  # train: killed while trainer_state.json is being written
    from transformers import trainer_callback

    state_cls = trainer_callback.TrainerState
    real = state_cls.save_to_json

    def torn(self: Any, json_path: str) -> None:
        if "checkpoint-" not in json_path or not c.hit():
            return real(self, json_path)
        import dataclasses
        import json

        _torn_write(json_path, json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")

    state_cls.save_to_json = torn


def _final_save(c: Counter) -> None:  # train: killed while the finished student is saved to --out
    from potstill.student_train import model

    real = model.DistillModel.save

    def torn(self: Any, folder: str, *args: Any, **kwargs: Any) -> None:
        if "checkpoint-" in str(folder) or not c.hit():
            return real(self, folder, *args, **kwargs)
        real(self, folder, *args, **kwargs)
        path = os.path.join(folder, "model.safetensors")  # as if killed while writing the weights
        with open(path, "rb") as f:
            data = f.read()
        _torn_write(path, data)

    model.DistillModel.save = torn


POINTS: dict[str, Callable[[Counter], None]] = {
    "hidden-chunk": _hidden_chunk,
    "shard-files": _shard_files,
    "commit-record": _commit_record,
    "after-commit": _after_commit,
    "lease": _lease,
    "manifest": _manifest,
    "copy-file": _copy_file,
    "copy-file-torn": _copy_file_torn,
    "train-step": _train_step,
    "checkpoint-model": _checkpoint_model,
    "checkpoint-optimizer": _checkpoint_optimizer,
    "checkpoint-state-torn": _checkpoint_state_torn,
    "final-save": _final_save,
}


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[2] != "--" or argv[0] not in POINTS:
        raise SystemExit(f"usage: killpoints.py POINT N -- potstill args (POINT: {', '.join(POINTS)})")
    point, nth, args = argv[0], int(argv[1]), argv[3:]
    POINTS[point](Counter(nth))
    from potstill.cli.main import main as potstill

    sys.argv = ["potstill", *args]
    potstill()


if __name__ == "__main__":
    main(sys.argv[1:])
