"""`python -m potstill.cli.reference [FILE]`: write the options reference of `potstill generate`,
`train`, `eval` and `serve` (default docs/reference/options.md) from their settings dataclasses, so the
reference says what the commands do; tests/test_settings.py checks the committed file is current."""

from __future__ import annotations

import sys

from potstill.settings import options_reference
from potstill.student_train.config import EvalConfig, TrainConfig
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.service.settings import ServeConfig

DEFAULT_PATH = "docs/reference/options.md"
COMMANDS: list[tuple[str, type, str, bool]] = [  # (command, its settings, intro, whether it takes --config)
    ("generate", GenerateConfig,
     "Runs a teacher over a prompt set and writes its targets into a store. A config file may keep the "
     "settings under a `generate` table. `potstill jobs submit` takes the same flags (all but `--progress`), "
     "and a job sent to `potstill serve` the same keys.", True),
    ("train", TrainConfig,
     "Trains a student from a store. A config file may keep the settings under a `train` table.", True),
    ("eval", EvalConfig,
     "Scores a trained student against the stored teacher on the held-out records. It takes flags only.", False),
    ("serve", ServeConfig,
     "Keeps a teacher loaded and runs generation jobs from a queue. A config file may keep the settings "
     "under a `serve` table; a repeatable flag takes one value or a list there.", True),
]


def render() -> str:
    return options_reference(COMMANDS)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else DEFAULT_PATH
    with open(path, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
