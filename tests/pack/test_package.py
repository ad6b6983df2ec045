"""The repository root as ComfyUI imports it, but outside ComfyUI: no host import, no error."""
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]


def test_root_package_imports_without_comfyui(tmp_path):
    (tmp_path / "comfyui_fera").symlink_to(PACK_ROOT)
    code = ("import sys, comfyui_fera; "
            "leaked = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'server')]; "
            "assert not leaked, leaked; assert comfyui_fera.WEB_DIRECTORY == './web'")
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path)}, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_requirements_leave_torch_to_the_host():
    lines = [l.split("#")[0].strip() for l in (PACK_ROOT / "requirements.txt").read_text().splitlines()]
    assert not [l for l in lines if l.lower().startswith(("torch", "torchvision", "torchaudio"))]


def test_pyproject_dependencies_are_requirements_txt():
    """One list of run-time needs, numpy included (without it `import torch` warns "Failed to initialize NumPy")."""
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    lines = [l.split("#")[0].strip() for l in (PACK_ROOT / "requirements.txt").read_text().splitlines()]
    declared = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(l for l in lines if l) == sorted(declared)
    assert "numpy" in declared
