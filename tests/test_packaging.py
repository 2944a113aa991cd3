"""The install: one `llmtp` package in site-packages, importable, with a version."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from cli_runner import run_llmtp

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"llmtp"} | {"llmtp." + ".".join(init.parent.relative_to(ROOT).parts)
                         for top in ("common", "coordinator", "worker") for init in (ROOT / top).rglob("__init__.py")}
    assert listed == found


def test_version_and_import():
    import llmtp
    assert run_llmtp("--version").stdout.strip() == f"llmtp {llmtp.__version__}"
    out = subprocess.run([sys.executable, "-c", "import llmtp, llmtp.coordinator.cli; print(llmtp.__version__)"],
                         capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == llmtp.__version__


def test_wheel_holds_only_the_llmtp_package(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path),
                            str(ROOT)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1:]}")
    wheel = next(tmp_path.glob("llmtp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"llmtp"}
    assert "llmtp/common/default_model/model.bin" in names
    assert "llmtp/worker/server.py" in names
