"""Imports run one way only: pallas_kernels <- dynaexq_jax <- checkpoints_convert. The kernels
know nothing of the model; the model finds the converter as an entry point, never by import."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoints_convert
from dynaexq_jax import cli
from dynaexq_jax.errors import ConverterNotInstalledError
from dynaexq_jax.serving import conversion

ROOT = Path(__file__).resolve().parent.parent


def _imported_modules(path: Path) -> set[str]:
    """Every module an `import` statement in the file names, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def _offenders(package: str, forbidden: str) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    return [f"{f.relative_to(ROOT)} imports {m}" for f in files for m in sorted(_imported_modules(f))
            if m == forbidden or m.startswith(forbidden + ".")]


def test_pallas_kernels_import_nothing_from_dynaexq_jax():
    assert _offenders("pallas_kernels", "dynaexq_jax") == []
    code = ("import importlib, pkgutil, sys, pallas_kernels\n"
            "for m in pkgutil.walk_packages(pallas_kernels.__path__, 'pallas_kernels.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dynaexq_jax', 'checkpoints_convert')))\n"
            "print(len([m for m in sys.modules if m.startswith('pallas_kernels.')]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, submodules = out.stdout.splitlines()
    assert loaded == "[]" and int(submodules) >= 7, out.stdout


def test_dynaexq_jax_imports_nothing_from_checkpoints_convert():
    assert _offenders("dynaexq_jax", "checkpoints_convert") == []


def test_the_converter_is_found_through_its_entry_point():
    assert conversion.hf_converter() is checkpoints_convert.convert


def test_without_the_converter_convert_is_a_typed_error_naming_the_package(monkeypatch, tmp_path, capsys):
    """What a dynaexq_jax installed without checkpoints_convert sees: no entry point in the group."""
    monkeypatch.setattr(conversion.importlib.metadata, "entry_points", lambda **_: ())
    with pytest.raises(ConverterNotInstalledError, match="checkpoints_convert"):
        conversion.hf_converter()
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "checkpoints_convert package" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_help_runs_without_loading_the_converter():
    code = ("import sys\n"
            "from dynaexq_jax import cli\n"
            "try:\n"
            "    cli.main(['convert', '--help'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "assert 'checkpoints_convert' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: dynaexq convert" in out.stdout and "HF_DIR" in out.stdout.upper(), out.stdout
