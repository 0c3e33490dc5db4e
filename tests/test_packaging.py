"""Installed, the project is one package, `potstill`, and nothing else at the top level of site-packages:
the repository's folders (store/, teacher_gen/, student_train/, cli/) are mapped onto `potstill.*`."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "potstill", "store", "teacher_gen", "student_train", "cli")


def test_the_wheel_installs_only_potstill_at_the_top_level(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy, so that the build leaves nothing in the working tree
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = glob.glob(str(tmp_path / "dist" / "potstill-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"potstill"}
    for module in ("potstill/__init__.py", "potstill/store/reader.py", "potstill/teacher_gen/runner.py",
                   "potstill/teacher_gen/service/app.py", "potstill/student_train/trainer.py",
                   "potstill/cli/main.py", "potstill/cli/demo/run.py",
                   "potstill/cli/demo/teacher_checkpoint/model.safetensors"):
        assert module in names, module
    # Every Python module of the source folders is in the wheel (a new subpackage must be listed in pyproject).
    for folder in ("potstill", "store", "teacher_gen", "student_train", "cli"):
        for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
            rel = os.path.relpath(path, ROOT)
            assert (rel if folder == "potstill" else "potstill/" + rel) in names, f"{rel} is not packaged"


def test_version_and_short_help():
    from potstill import __version__

    out = subprocess.run([sys.executable, "-m", "potstill.cli.main", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"potstill {__version__}", out
    out = subprocess.run([sys.executable, "-m", "potstill.cli.main", "-h"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "generate" in out.stdout and "train" in out.stdout, out
    out = subprocess.run([sys.executable, "-m", "potstill.cli.main", "store", "-h"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "verify" in out.stdout, out
