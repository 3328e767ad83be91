"""Every CUDA source compiles with NVRTC, for sm_80 and sm_90, with every instantiation the
CuPy loader uses -- no GPU needed.

Each .cu file listed in the CUDA_SOURCES tables of the op packages' `_cupy.py` (the ops of
`sortgrad.kernels._backends.REGISTRY` with a "cupy" module, `cupy_loader.OP_PACKAGES`; an op
whose `_cupy.py` does not exist yet is skipped, one that fails to import fails its own test) is
compiled to a cubin, as CuPy does on a GPU, with the loader's own
options (include path: the shared .cuh files and the CCCL bundled with CuPy), the options CuPy
adds itself, and warnings as errors; every name expression must lower to a kernel. A second
check keeps the instantiation tables and the sources in step: every kernel of a source is
instantiated, every instantiation names a kernel of its source. A third one reads the PTX of
the sources that must keep float32 subnormals (`FTZ_SAFE_SOURCES`) for instructions that
CuPy's `-ftz=true` makes flush them to zero.
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


def _nvrtc(package: str, filename: str, expressions, options, want_ptx: bool):
    """(ok, log, name expressions that did not lower, PTX or None) of one NVRTC compilation."""
    try:
        source = cupy_loader.source_text(package, filename).encode()
    except OSError as err:  # listed in CUDA_SOURCES but not (yet) shipped
        return False, f"cannot read {package}/{filename}: {err}", list(expressions), None
    prog = _check(nvrtc.nvrtcCreateProgram(source, filename.encode(), 0, [], []), "create")
    try:
        for expression in expressions:
            _check(nvrtc.nvrtcAddNameExpression(prog, expression.encode()), expression)
        options = [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        log = log.rstrip(b"\x00 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return False, log, list(expressions), None
        missing = [e for e in expressions
                   if nvrtc.nvrtcGetLoweredName(prog, e.encode())[0]
                   != nvrtc.nvrtcResult.NVRTC_SUCCESS]
        ptx = None
        if want_ptx:
            ptx = b" " * _check(nvrtc.nvrtcGetPTXSize(prog), "PTX size")
            _check(nvrtc.nvrtcGetPTX(prog, ptx), "PTX")
            ptx = ptx.rstrip(b"\x00").decode()
        return True, log, missing, ptx
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_source(package: str, filename: str, expressions, arch: int):
    """(ok, log, name expressions that did not lower) of one NVRTC compilation to a cubin."""
    options = (cupy_loader.compile_options(arch) + cupy_loader.CUPY_IMPLICIT_OPTIONS
               + WARNINGS_AS_ERRORS)
    return _nvrtc(package, filename, expressions, options, want_ptx=False)[:3]


def compile_ptx(package: str, filename: str, expressions, arch: int):
    """(ok, log, PTX) of the same compilation for the virtual architecture compute_<arch> (NVRTC
    keeps no PTX of a cubin compilation); CuPy's implicit options, -ftz=true among them."""
    options = tuple(f"-arch=compute_{arch}" if o == f"-arch=sm_{arch}" else o
                    for o in cupy_loader.compile_options(arch))
    assert f"-arch=compute_{arch}" in options
    ok, log, _, ptx = _nvrtc(package, filename, expressions,
                             options + cupy_loader.CUPY_IMPLICIT_OPTIONS + WARNINGS_AS_ERRORS,
                             want_ptx=True)
    return ok, log, ptx


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


# --- float32 subnormals under CuPy's -ftz=true ------------------------------------------------
# CuPy compiles every RawModule with -ftz=true (CUPY_IMPLICIT_OPTIONS): float32 arithmetic,
# comparisons and float32 <-> float64 conversions then flush subnormal float32 operands and
# results to zero (PTX `.ftz`). The CPU backend keeps them, so these sources must not let a
# float32 value meet such an instruction: their float32 data is widened and narrowed through
# its bits (sortgrad_float.cuh) and all arithmetic is float64. The host emulator cannot see
# this (it does not flush), the PTX can.
FTZ_SAFE_SOURCES = ("isotonic.cu", "soft.cu")

_PTX_FUNCTION = re.compile(r"^(?=(?:\.(?:visible|weak|extern)\s+)*\.(?:entry|func)\b)",
                           re.MULTILINE)
_PTX_INSTRUCTION = re.compile(r"^[ \t]*(?:@!?%\w+[ \t]+)?([a-z][a-z0-9_.]*)[ \t]+([^;]*);",
                              re.MULTILINE)  # opcode, operands
_PTX_OPERAND = re.compile(r"\{[^}]*\}|[^,\s][^,]*")  # a vector {a, b} is one operand
_F32_REGISTER = re.compile(r"%f\d+\b")  # NVVM's float32 registers (%fd<N>: float64)


def _ptx_instructions(body: str):
    """(opcode, operands) of one PTX function body, in order."""
    return [(m.group(1), [a.strip() for a in _PTX_OPERAND.findall(m.group(2))])
            for m in _PTX_INSTRUCTION.finditer(body)]


def _double_word_views(instructions) -> set[str]:
    """Float32 registers that only ever hold a 32-bit word of a float64's bits (and abs of
    one): what libdevice's double exp / log compare (e.g. `abs.ftz.f32` and `setp.lt.ftz.f32`
    of the high word as a range test). Flushing those is part of libdevice's -ftz variant,
    which is right for every double; they never hold float32 data."""
    defs: dict[str, list] = {}
    for op, args in instructions:
        for reg in re.findall(r"%\w+", args[0]) if args and args[0] else ():
            defs.setdefault(reg, []).append((op, args))
    words = {reg for reg, ds in defs.items()
             if all(op == "mov.b64" and args[0].startswith("{") and len(args) >= 2
                    and re.fullmatch(r"%fd\d+", args[-1]) for op, args in ds)}
    views: set[str] = set()
    grew = True
    while grew:
        grew = False
        for reg, ds in defs.items():
            if reg in views or not _F32_REGISTER.fullmatch(reg):
                continue
            if all((op == "mov.b32" and args[1] in words)
                   or (op == "abs.ftz.f32" and args[1] in views) for op, args in ds):
                views.add(reg)
                grew = True
    return views


def ftz_hazards(ptx: str) -> list[str]:
    """The instructions of `ptx` that may flush float32 data: every `cvt` with `.ftz` and a
    float32 side (cvt.ftz.f64.f32, cvt.rn.ftz.f32.f64, ...), every other `.ftz` instruction on
    float32 (add, sub, mul, div, fma, min, max, neg, abs, setp, ...) except abs / setp whose
    float32 operands are all words of a float64's bits (`_double_word_views`)."""
    hazards = []
    for body in _PTX_FUNCTION.split(ptx):
        instructions = _ptx_instructions(body)
        views = None
        for op, args in instructions:
            parts = op.split(".")
            if "ftz" not in parts or "f32" not in parts:
                continue
            if parts[0] in ("abs", "setp"):
                if views is None:
                    views = _double_word_views(instructions)
                sources = [r for a in args[1:] for r in _F32_REGISTER.findall(a)]
                if all(r in views for r in sources):
                    continue
            hazards.append(f"{op} {', '.join(args)}")
    return hazards


def test_ftz_scanner():
    ptx = """
.visible .entry k(.param .u64 k_param_0)
{
\t.reg .f32 \t%f<9>;
\tld.global.nc.f32 \t%f1, [%rd1];
\tcvt.ftz.f64.f32 \t%fd1, %f1;
\tcvt.rn.ftz.f32.f64 \t%f2, %fd2;
\tneg.ftz.f32 \t%f3, %f2;
\tsetp.lt.ftz.f32 \t%p1, %f1, 0f00000000;
\t{
\t.reg .b32 %temp;
\tmov.b64 \t{%temp, %r16}, %fd1;
\t}
\tmov.b32 \t%f4, %r16;
\tabs.ftz.f32 \t%f5, %f4;
\t@%p1 setp.geu.ftz.f32 \t%p2, %f5, 0f40874800;
\tsetp.eq.ftz.f32 \t%p3, %f4, 0f00000000;
\tmov.b32 \t%f6, %r17;
\tsetp.eq.ftz.f32 \t%p4, %f6, 0f00000000;
\tadd.ftz.f32 \t%f7, %f4, %f4;
\tcvt.f64.f32 \t%fd3, %f1;
\tadd.rn.f64 \t%fd4, %fd3, %fd3;
\trcp.approx.ftz.f64 \t%fd5, %fd4;
\tst.global.f32 \t[%rd2], %f2;
}
"""
    assert [h.split()[0] for h in ftz_hazards(ptx)] == [
        "cvt.ftz.f64.f32", "cvt.rn.ftz.f32.f64", "neg.ftz.f32", "setp.lt.ftz.f32",
        "setp.eq.ftz.f32",  # %f6: bits of a 32-bit integer, not a word of a double
        "add.ftz.f32"]      # only abs and setp of double words are libdevice's
    assert ftz_hazards(ptx.replace(".ftz", "")) == []


FTZ_SOURCES = [source for source in SOURCES if source[1] in FTZ_SAFE_SOURCES]


def test_ftz_safe_sources_are_listed():
    assert {filename for _, filename, _ in FTZ_SOURCES} == set(FTZ_SAFE_SOURCES)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("package,filename,expressions", FTZ_SOURCES,
                         ids=[filename for _, filename, _ in FTZ_SOURCES])
def test_float32_subnormals_survive_ftz(package, filename, expressions, arch):
    """Under -ftz=true (as CuPy compiles), the PTX of every instantiation has no flushing
    float32 <-> float64 conversion and no flushing float32 arithmetic on data."""
    ok, log, ptx = compile_ptx(package, filename, expressions, arch)
    assert ok, f"{filename} (compute_{arch}) failed to compile:\n{log}"
    hazards = ftz_hazards(ptx)
    counts: dict[str, int] = {}
    for h in hazards:
        counts[h.split()[0]] = counts.get(h.split()[0], 0) + 1
    assert not hazards, (f"{filename} (compute_{arch}): float32 flushed to zero under -ftz=true "
                         f"by {counts}, e.g. {hazards[:5]}")
