"""The wheel carries the recipes and card templates, so `hfrecipes pretrain --config tiny/pretrain` works after a
plain `pip install`; the CLI starts without importing torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_recipes_and_cards(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("hfrecipes-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in (p.relative_to(ROOT) for p in (ROOT / "recipes").rglob("*.yaml")):
        assert f"hfrecipes/{rel}" in names, rel
    assert "hfrecipes/cards/default.md" in names
    assert "hfrecipes/llama_cpp_check.mjs" in names  # the GGUF export's llama.cpp check runs it
    assert not any("tests/" in n for n in names)


def test_help_is_instant_without_torch():
    code = "import sys; from hfrecipes.cli import main; main(['recipes']); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("False"), r.stdout + r.stderr
