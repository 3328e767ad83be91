"""A non-editable build ships every CUDA source the CuPy loader compiles at run time."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _can_build_without_isolation() -> bool:
    """setuptools >= 64 with a bdist_wheel command (built in from 70.1, else the `wheel`
    package); otherwise pip builds in an isolated environment from the registry."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1):
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return major >= 64


@pytest.mark.slow
def test_wheel_contains_the_cuda_sources(tmp_path):
    sources = sorted(p.relative_to(ROOT).as_posix()
                     for pattern in ("*.cu", "*.cuh")
                     for p in (ROOT / "sortgrad").rglob(pattern))
    assert sources, "no CUDA sources found"
    # a clean copy: no egg-info of an editable install, whose file list would hide a missing
    # package-data rule
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "sortgrad", src / "sortgrad",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path),
           str(src)]
    if _can_build_without_isolation():
        cmd.insert(4, "--no-build-isolation")  # the installed setuptools: no download
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (wheel,) = tmp_path.glob("sortgrad-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [s for s in sources if s not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "sortgrad/kernels/_cuda/cupy_loader.py" in names
