"""Numba's disk cache must not serve kernels compiled from older sources of the helpers they
inline from other files (`sortgrad.kernels._jit_cache`).

Each case copies the package to a temporary directory and runs a small program in fresh
interpreters: a cached kernel in `sortgrad/kernels/` that inlines `isotonic._cpu.pav_l2_row`
(another file, another directory) runs once, the helper is edited, and the next run must see the
edit although the kernel's own file is unchanged; a run without edits must load the cache.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numba
import pytest

# the sources under test, found without importing them (the tests run copies)
PACKAGE = Path(importlib.util.find_spec("sortgrad").origin).resolve().parent

PROBE_MODULE = "_probe_jit_cache"
PROBE = '''\
import numba
import numpy as np

from sortgrad.kernels.isotonic._cpu import no_keys, pav_l2_row


@numba.njit(cache=True)
def probe(y):
    sol = np.empty(y.shape[0], dtype=np.float64)
    blocks = np.empty(y.shape[0], dtype=np.int32)
    pav_l2_row(y, no_keys(), sol, blocks)
    return blocks
'''

PROGRAM = f'''\
import json, os, sys
from sortgrad.kernels._jit_cache import ensure_fresh
ensure_fresh()
import numpy as np
import sortgrad
from sortgrad.kernels import {PROBE_MODULE} as p
assert sortgrad.__file__.startswith(os.environ["PROBE_ROOT"]), sortgrad.__file__
blocks = p.probe(np.array([2.0, 1.0, 1.0, 0.0]))  # [0, 1, 1, 2]; negated: [0, 0, 0, 0]
print(json.dumps({{"blocks": blocks.tolist(),
                  "hits": sum(p.probe.stats.cache_hits.values()),
                  "misses": sum(p.probe.stats.cache_misses.values())}}))
'''


def _copy_package(root: Path) -> Path:
    pkg = root / "sortgrad"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    # Only the kernel layer (NumPy + Numba) is under test: skip the JAX bindings' import.
    (pkg / "__init__.py").write_text('"""sortgrad, kernel layer only (test copy)."""\n')
    (pkg / "kernels" / f"{PROBE_MODULE}.py").write_text(PROBE)
    return pkg


def _edit_helper(pkg: Path) -> None:
    """Changes pav_l2_row (in isotonic/_cpu.py) so that the probe's block ids change: it fits
    the negated input."""
    path = pkg / "kernels" / "isotonic" / "_cpu.py"
    source = path.read_text()
    fn = next(node for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.FunctionDef) and node.name == "pav_l2_row")
    lines = source.splitlines(keepends=True)
    first = fn.body[1] if isinstance(fn.body[0], ast.Expr) and len(fn.body) > 1 else fn.body[0]
    arg = fn.args.args[0].arg
    lines.insert(first.lineno - 1, f"{' ' * first.col_offset}{arg} = -{arg}\n")
    edited_source = "".join(lines)
    assert edited_source != source
    path.write_text(edited_source)


def _run(root: Path, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _probe_cache_files(search_root: Path) -> dict:
    """{path: mtime_ns} of the probe's index and data files, and of the stamps beside them."""
    entries = [p for p in search_root.rglob(f"{PROBE_MODULE}.probe-*")
               if p.suffix in (".nbi", ".nbc")]
    stamps = {p.parent / "sortgrad-kernels.digest" for p in entries}
    return {str(p): p.stat().st_mtime_ns for p in [*entries, *stamps] if p.exists()}


CASES = {
    "in_tree": {},  # sortgrad/kernels/__pycache__
    "numba_cache_dir": {"NUMBA_CACHE_DIR": "{tmp}/numba_cache"},
    # Numba's user-wide location ($XDG_CACHE_HOME/numba/...), used when the source tree is not
    # writable; selected here with Numba's locator setting (a read-only tree does not stop root).
    "user_wide": {"NUMBA_CACHE_LOCATOR_CLASSES": "UserWideCacheLocator",
                  "XDG_CACHE_HOME": "{tmp}/xdg_cache"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_edit_of_inlined_helper_in_another_file_invalidates_cache(tmp_path, case):
    if case == "user_wide" and not hasattr(numba.config, "CACHE_LOCATOR_CLASSES"):
        pytest.skip("this Numba has no NUMBA_CACHE_LOCATOR_CLASSES")
    pkg = _copy_package(tmp_path)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NUMBA_") and k != "XDG_CACHE_HOME"}
    env.update({k: v.format(tmp=tmp_path) for k, v in CASES[case].items()})
    env.update(PYTHONPATH=str(tmp_path), PROBE_ROOT=str(tmp_path), NUMBA_DISABLE_JIT="0")
    cache_root = {"in_tree": pkg, "numba_cache_dir": tmp_path / "numba_cache",
                  "user_wide": tmp_path / "xdg_cache" / "numba"}[case]

    first = _run(tmp_path, env)
    assert first["misses"] == 1, first
    assert _probe_cache_files(cache_root), f"no cache entry of the probe under {cache_root}"

    _edit_helper(pkg)
    second = _run(tmp_path, env)
    assert second["blocks"] != first["blocks"], (
        "the kernel was served from Numba's cache compiled against the old helper")
    assert second["misses"] == 1 and second["hits"] == 0, second

    cached = _probe_cache_files(cache_root)
    assert any(p.endswith(".digest") for p in cached), cached
    third = _run(tmp_path, env)
    assert third == {**second, "hits": 1, "misses": 0}, (second, third)
    assert _probe_cache_files(cache_root) == cached, "unchanged sources must keep the cache"


def test_ensure_fresh_is_cheap_and_idempotent(tmp_path, monkeypatch):
    """Runs the module of a copy in this process (the checkout's own cache is left alone)."""
    import importlib.util
    import time

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    pkg = _copy_package(tmp_path)
    cache = pkg / "kernels" / "isotonic" / "__pycache__"
    cache.mkdir()
    stale = cache / "_cpu._pav_l2-1.py311.nbi"
    other = cache / "_cpu.cpython-311.pyc"
    stale.write_bytes(b"")
    other.write_bytes(b"")
    spec = importlib.util.spec_from_file_location("_jit_cache_copy",
                                                  pkg / "kernels" / "_jit_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    module.ensure_fresh()
    assert not stale.exists() and other.exists()
    stamp = (cache / module.STAMP_NAME).read_text()
    stale.write_bytes(b"")  # written under the current sources: kept from now on
    start = time.perf_counter()
    for _ in range(5):
        module._ensured = None  # the full check, as in a new process
        module.ensure_fresh()
    assert (time.perf_counter() - start) / 5 < 0.05
    assert stale.exists() and (cache / module.STAMP_NAME).read_text() == stamp


CONCURRENT = '''\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_jit_cache_copy", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print("ready", flush=True)
sys.stdin.read()  # start together
module.ensure_fresh()
'''


def test_concurrent_processes(tmp_path):
    """Several processes cleaning the same stale cache at once (as under pytest-xdist)."""
    pkg = _copy_package(tmp_path)
    cache = pkg / "kernels" / "soft" / "__pycache__"
    cache.mkdir(parents=True)
    stale = [cache / f"_cpu._k{i}-{i}.py311.{j}.nbc" for i in range(50) for j in (1, 2)]
    stale += [cache / f"_cpu._k{i}-{i}.py311.nbi" for i in range(50)]
    for path in stale:
        path.write_bytes(b"")
    (cache / "sortgrad-kernels.digest").write_text("old\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT,
                               str(pkg / "kernels" / "_jit_cache.py")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True)
             for _ in range(6)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.communicate(timeout=120)
    for p in procs:
        p.stdin.close()
    for p in procs:
        p.wait(timeout=120)
    errors = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), errors
    assert not any(path.exists() for path in stale)
    stamp = (cache / "sortgrad-kernels.digest").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", stamp)
    assert sorted(p.name for p in cache.iterdir()) == ["sortgrad-kernels.digest"]
