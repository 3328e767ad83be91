"""Every CUDA source compiles with NVRTC, for sm_80 and sm_90, with every instantiation the
CuPy loader uses -- no GPU needed.

Each .cu file listed in the CUDA_SOURCES tables of the op packages' `_cupy.py` (the ops of
`sortgrad.kernels._backends.REGISTRY` with a "cupy" module, `cupy_loader.OP_PACKAGES`; an op
whose `_cupy.py` does not exist yet is skipped, one that fails to import fails its own test) is
compiled to a cubin, as CuPy does on a GPU, with the loader's own
options (include path: the shared .cuh files and the CCCL bundled with CuPy), the options CuPy
adds itself, and warnings as errors; every name expression must lower to a kernel. A second
check keeps the instantiation tables and the sources in step: every kernel of a source is
instantiated, every instantiation names a kernel of its source.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

nvrtc = pytest.importorskip(
    "cuda.bindings.nvrtc", reason="needs cuda-bindings and an NVRTC library (pip install -e "
    "'.[test]')")

from sortgrad.kernels._cuda import cupy_loader  # noqa: E402

ARCHS = (80, 90)
WARNINGS_AS_ERRORS = ("-Werror=all-warnings",)


def _collect():
    """(package, filename, expressions) of every listed .cu file, and package -> import error
    of the CuPy modules that fail to import (reported by test_cupy_modules_import, so that one
    half-written module does not stop the collection of the others)."""
    sources, broken = [], {}
    for package in cupy_loader.OP_PACKAGES:
        try:
            found = cupy_loader._package_sources(package)
        except Exception as err:  # noqa: BLE001 - any import failure of a module under work
            broken[package] = f"{type(err).__name__}: {err}"
            continue
        for filename, expressions in (found or {}).items():
            sources.append((package, filename, tuple(expressions)))
    return sources, broken


SOURCES, BROKEN = _collect()
_CUDA_DIR = os.path.dirname(cupy_loader.__file__)


def _check(result, what):
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what}: {nvrtc.nvrtcGetErrorString(err)[1].decode()}")
    return result[1] if len(result) > 1 else None


def compile_source(package: str, filename: str, expressions, arch: int):
    """(ok, log, name expressions that did not lower) of one NVRTC compilation."""
    try:
        source = cupy_loader.source_text(package, filename).encode()
    except OSError as err:  # listed in CUDA_SOURCES but not (yet) shipped
        return False, f"cannot read {package}/{filename}: {err}", list(expressions)
    prog = _check(nvrtc.nvrtcCreateProgram(source, filename.encode(), 0, [], []), "create")
    try:
        for expression in expressions:
            _check(nvrtc.nvrtcAddNameExpression(prog, expression.encode()), expression)
        options = [o.encode() for o in cupy_loader.compile_options(arch)
                   + cupy_loader.CUPY_IMPLICIT_OPTIONS + WARNINGS_AS_ERRORS]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        log = log.rstrip(b"\x00 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return False, log, list(expressions)
        missing = [e for e in expressions
                   if nvrtc.nvrtcGetLoweredName(prog, e.encode())[0]
                   != nvrtc.nvrtcResult.NVRTC_SUCCESS]
        return True, log, missing
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@pytest.fixture(scope="module")
def compiled():
    """All (source, arch) compilations, two at a time (NVRTC releases the GIL)."""
    jobs = [(package, filename, expressions, arch)
            for package, filename, expressions in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: compile_source(*job), jobs))
    return {(job[0], job[1], job[3]): result for job, result in zip(jobs, results)}


def test_op_packages_follow_the_registry():
    from sortgrad.kernels import _backends
    assert cupy_loader.OP_PACKAGES == tuple(
        f"sortgrad.kernels.{op}" for op, backends in _backends.REGISTRY.items()
        if "cupy" in backends)


@pytest.mark.parametrize("package", cupy_loader.OP_PACKAGES)
def test_cupy_modules_import(package):
    """Each op's CuPy module imports without CuPy (or does not exist yet: skipped)."""
    assert package not in BROKEN, f"{package}'s CuPy module fails to import: {BROKEN[package]}"
    if cupy_loader._package_sources(package) is None:
        pytest.skip(f"{package} has no CuPy module yet")


def test_sources_are_listed():
    names = {filename for _, filename, _ in SOURCES}
    # these packages always have CuPy modules (others, e.g. soft, once they land)
    assert {"segmented_sort.cu", "top_k.cu", "permutation.cu", "isotonic.cu"} <= names
    for package, filename, expressions in SOURCES:
        assert expressions, f"{package}/{filename} lists no instantiations"
        assert len(set(expressions)) == len(expressions), f"{filename}: duplicate expressions"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("package,filename,expressions", SOURCES,
                         ids=[filename for _, filename, _ in SOURCES])
def test_compiles_with_nvrtc(compiled, package, filename, expressions, arch):
    ok, log, missing = compiled[(package, filename, arch)]
    assert ok, f"{filename} (sm_{arch}) failed to compile:\n{log}"
    assert not missing, f"{filename} (sm_{arch}): name expressions without a kernel: {missing}"


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


_KERNEL = re.compile(
    r"(template\s*<[^;{}]*?>\s*)?__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+"
    r"(?:(?:SG_LAUNCH_BOUNDS|__launch_bounds__)\s*\([^)]*\)\s*)?(\w+)\s*\(")


def kernels_of(text: str) -> dict[str, bool]:
    """Kernel name -> whether it is a template, of one source text."""
    return {m.group(2): m.group(1) is not None for m in _KERNEL.finditer(_strip_comments(text))}


def _base_name(expression: str) -> tuple[str, bool]:
    m = re.fullmatch(r"\s*(?:\w+::)*(\w+)\s*(<.*>)?\s*", expression)
    assert m, f"not a kernel name expression: {expression!r}"
    return m.group(1), m.group(2) is not None


def test_kernel_scanner():
    text = """template <class B, int X>
    __global__ void SG_LAUNCH_BOUNDS(256)
    alpha(const B* x) {}
    // __global__ void commented(int) {}
    __global__ void beta(int n) {}"""
    assert kernels_of(text) == {"alpha": True, "beta": False}
    assert _base_name("sg_iso::isotonic_fwd<float, 0>") == ("isotonic_fwd", True)


@pytest.mark.parametrize("package,filename,expressions", SOURCES,
                         ids=[filename for _, filename, _ in SOURCES])
def test_instantiations_match_templates(package, filename, expressions):
    kernels = kernels_of(cupy_loader.source_text(package, filename))
    assert kernels, f"{filename} defines no kernels"
    used = {}
    for expression in expressions:
        name, templated = _base_name(expression)
        assert name in kernels, f"{filename}: {expression!r} names no kernel of the source"
        assert templated == kernels[name], (
            f"{filename}: {expression!r} and the kernel's template-ness disagree")
        used.setdefault(name, []).append(expression)
    unused = sorted(set(kernels) - set(used))
    assert not unused, f"{filename}: kernels never instantiated by CUDA_SOURCES: {unused}"


def test_shared_headers_define_no_kernels():
    """Kernels live in the .cu files, where the instantiation check sees them."""
    for name in os.listdir(_CUDA_DIR):
        if name.endswith(".cuh"):
            with open(os.path.join(_CUDA_DIR, name)) as f:
                assert not kernels_of(f.read()), f"{name} defines a kernel"


def test_loader_options():
    options = cupy_loader.compile_options()
    assert "-std=c++17" in options
    assert not any(o.startswith("-arch") for o in options)  # CuPy picks the device's
    assert cupy_loader.compile_options(90)[-1] == "-arch=sm_90"
    for d in cupy_loader.include_dirs():
        assert os.path.isdir(d), d
    assert os.path.isfile(os.path.join(cupy_loader.include_dirs()[1], "cub", "cub.cuh"))
