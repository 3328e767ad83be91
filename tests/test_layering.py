"""The layering of DESIGN.md section 1, read off the sources (imports parsed, nothing run).

- `sortgrad/kernels/` imports no JAX;
- `sortgrad/bindings/` imports only the public kernel API (`sortgrad.kernels` and its public
  names), never a private kernel module (`kernels._backends`, `kernels.<op>._cpu`, ...);
- `sortgrad/_validate.py` imports no framework;
- the registry lists exactly the op folders, each with a contract (`__init__.py` with
  `__all__`) and the modules it names.
"""

import ast
import pathlib

import pytest

import sortgrad
from sortgrad import kernels
from sortgrad.kernels import _backends

PACKAGE = pathlib.Path(sortgrad.__file__).parent


def _imports(path: pathlib.Path):
    """(absolute module name, imported names) of every import in a module of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if module_parts[-1] == "__init__":
        module_parts = module_parts[:-1]
    package_parts = module_parts if path.name == "__init__.py" else module_parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[:len(package_parts) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield name, tuple(alias.name for alias in node.names)


def _modules(folder: str):
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("kernels"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_kernels_import_no_jax(path):
    for name, _ in _imports(path):
        assert not (name == "jax" or name.startswith(("jax.", "jaxlib"))), (path, name)


@pytest.mark.parametrize("path", _modules("bindings"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_bindings_use_only_the_public_kernel_api(path):
    for name, names in _imports(path):
        if not name.startswith("sortgrad.kernels"):
            continue
        assert name == "sortgrad.kernels", f"{path}: imports the kernel module {name}"
        for imported in names:
            assert imported in kernels.__all__, f"{path}: imports sortgrad.kernels.{imported}"


def test_validate_is_framework_free():
    for name, _ in _imports(PACKAGE / "_validate.py"):
        assert name.split(".")[0] in ("__future__", "functools", "math", "numbers", "operator", "numpy"), name


def test_registry_lists_every_op_folder_and_its_modules():
    folders = {p.parent.name for p in (PACKAGE / "kernels").glob("*/__init__.py")
               if not p.parent.name.startswith("_")}
    assert folders == set(_backends.OPS)
    for op, modules in _backends.REGISTRY.items():
        assert set(modules) <= set(_backends.BACKENDS)
        for backend, module in modules.items():
            assert (PACKAGE / "kernels" / op / f"{module}.py").is_file(), (op, backend)
        contract = __import__(f"sortgrad.kernels.{op}", fromlist=["__all__"])
        assert contract.__all__ and all(name in kernels.__all__ for name in contract.__all__)


def test_cpu_modules_follow_the_row_protocol():
    """Every CPU module declares DTYPES and takes `out=` in each of its row functions."""
    import inspect
    for op in _backends.OPS:
        module = _backends.backend_module(op, "cpu")
        assert hasattr(module, "DTYPES"), op
        row_functions = [f for name, f in vars(module).items()
                         if name.endswith("_rows") and not name.startswith("_")
                         and inspect.isfunction(f) and f.__module__ == module.__name__]
        assert row_functions, op
        for fn in row_functions:
            assert "out" in inspect.signature(fn).parameters, (op, fn.__name__)


def test_importing_the_kernels_loads_no_jax():
    """`import sortgrad.kernels` (the NumPy/CuPy API) never imports JAX; `sortgrad.sort` does."""
    import subprocess
    import sys
    code = ("import sys, sortgrad.kernels; assert 'jax' not in sys.modules, 'jax imported'; "
            "import sortgrad; sortgrad.sort; assert 'jax' in sys.modules; "
            "assert 'soft_rank' in dir(sortgrad) and 'sort' in sortgrad.__all__")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
