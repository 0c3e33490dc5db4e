"""`python -m potstill.cli.reference [FILE]`: write the options reference of every `potstill` command
(default docs/reference/options.md) from their settings dataclasses, so the reference says what the
commands do; tests/test_settings.py checks the committed file is current."""

from __future__ import annotations

import sys

from potstill.cli.demo.run import DemoConfig
from potstill.cli.jobs_cmd import JobsConfig, ListConfig, SubmitConfig, WaitConfig
from potstill.cli.store_cmd import ExportConfig, PublishConfig, VerifyConfig
from potstill.settings import options_reference
from potstill.share.report import ReportConfig
from potstill.student_train.config import EvalConfig, TrainConfig
from potstill.student_train.student_init import StudentInitConfig
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
    ("student init", StudentInitConfig,
     "Writes a student made from its teacher: the teacher's architecture with fewer layers (and optionally "
     "narrower), its tensors copied where the student keeps them, its tokenizer and chat template. "
     "It takes flags only; `--config` is the student's shape, not a file of settings.", False),
    ("serve", ServeConfig,
     "Keeps a teacher loaded and runs generation jobs from a queue. A config file may keep the settings "
     "under a `serve` table; a repeatable flag takes one value or a list there.", True),
    ("store verify", VerifyConfig,
     "Recomputes every checksum of a store (`potstill store verify STORE`) and checks schema and counts. "
     "`store info` and `store copy` take no settings besides their store paths (and info's `--json`).", False),
    ("store export", ExportConfig, "Writes one row per record of a store as Parquet or JSONL.", False),
    ("store report", ReportConfig, "Writes one self-contained HTML page about what a store holds.", False),
    ("store publish", PublishConfig, "Writes a store as a Hugging Face Hub dataset folder (Parquet, a dataset card).",
     False),
    ("demo", DemoConfig,
     "Distils a built-in 4-digit-addition teacher into two students and compares them, on CPU. "
     "The defaults are the tuned demo.", False),
    ("jobs submit", SubmitConfig,
     "Submits a generation job to a `potstill serve`. Any `potstill generate` flag may follow; its "
     "`--config` file holds generate settings (with `prompts` and `store`), not these.", False),
    ("jobs status", JobsConfig, "Shows a job. `potstill jobs cancel` takes the same settings.", False),
    ("jobs list", ListConfig, "Lists the service's jobs, oldest first.", False),
    ("jobs wait", WaitConfig, "Waits until a job finishes.", False),
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
