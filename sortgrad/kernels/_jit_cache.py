"""Keeps Numba's on-disk cache of the kernels consistent with their sources.

Invariant: a cached kernel is served only if every kernel source (every ``*.py`` under
``sortgrad/kernels/``) is byte-identical to when it was cached, under the same Numba version.

Numba checks a cache entry against the source of the kernel's own file only, but the kernels
inline ``inline="always"`` helpers from other files (``isotonic._cpu.pav_*_row`` into
``soft._cpu``, ``_keys.key_of`` into ``segmented_sort._cpu`` and ``top_k._cpu``, ...): after an
edit of a helper Numba would keep serving machine code compiled from the old helper.
`ensure_fresh` digests all kernel sources and, in every directory where Numba may cache this
package's kernels, deletes the package's ``.nbi``/``.nbc`` files when the digest recorded there
(``sortgrad-kernels.digest``) differs, then records the new one. Unchanged sources keep their
cache. It must run before a kernel is first called: Numba builds a dispatcher's cache object
when the decorator runs, but reads the index file only when it compiles a signature (the first
call with new argument types), so running it when ``sortgrad.kernels`` is imported is early
enough. Numba itself is only read here (its cache-path rules), never patched.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid

import numba

STAMP_NAME = "sortgrad-kernels.digest"
_CACHE_SUFFIXES = (".nbi", ".nbc")  # index first: an index never names a deleted data file
_KERNELS_DIR = os.path.dirname(os.path.abspath(__file__))

_lock = threading.Lock()
_ensured = None  # (digest, Numba's cache setting) last made fresh in this process


def _sources(root: str):
    """{directory: module names} of the ``*.py`` files under root, and the digest of them."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    hasher = hashlib.sha256(f"numba {numba.__version__}\0".encode())
    modules = {}
    for path in sorted(files, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/")):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:  # vanished or unreadable: digest its absence
            data = b"\0missing"
        rel = os.path.relpath(path, root).replace(os.sep, "/").encode()
        hasher.update(b"%d:%s%d:" % (len(rel), rel, len(data)))
        hasher.update(data)
        modules.setdefault(os.path.dirname(path), set()).add(
            os.path.splitext(os.path.basename(path))[0])
    return modules, hasher.hexdigest()


def _cache_subpath(src_dir: str) -> str:
    """Numba's subdirectory (of a user-wide or user-provided cache root) for src_dir."""
    py_file = os.path.join(src_dir, "__init__.py")
    try:
        from numba.core.caching import _CacheLocator
        return _CacheLocator.get_suitable_cache_subpath(py_file)
    except (ImportError, AttributeError):  # Numba's rule as of 0.59-0.68
        subpath = os.path.dirname(os.path.abspath(py_file))
        return "_".join([os.path.split(subpath)[-1],
                         hashlib.sha1(subpath.encode()).hexdigest()])


def _cache_roots():
    """Numba's cache roots in its locator order: (NUMBA_CACHE_DIR or None, user-wide or None)."""
    from numba.core import config
    user_wide = None
    try:
        from numba.misc.appdirs import AppDirs
        user_wide = AppDirs(appname="numba", appauthor=False).user_cache_dir
    except Exception:  # noqa: BLE001 - no user-wide location: nothing to clean there
        pass
    return (getattr(config, "CACHE_DIR", "") or None), user_wide


def _is_package_entry(name: str, modules) -> bool:
    """Whether a cache file name (``[prefix-]<module>.<qualname>-<line>.pyXY[.N].nb?``) is an
    entry of one of the module names."""
    if not name.endswith(_CACHE_SUFFIXES):
        return False
    head = name.split(".", 1)[0]
    return head in modules or head.rsplit("-", 1)[-1] in modules


def _read_stamp(path: str):
    try:
        with open(path, "rb") as f:
            return f.read().strip().decode("ascii", "replace")
    except OSError:
        return None


def _write_stamp(path: str, digest: str) -> bool:
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(digest.encode("ascii") + b"\n")
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def _refresh(cache_dir: str, modules, digest: str, create: bool) -> bool:
    """Makes cache_dir hold no entry of `modules` compiled from other sources than `digest`.
    Returns whether cache_dir is now a fresh, writable cache directory (the one Numba can use);
    never raises."""
    if create:
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError:
            return False
    stamp = os.path.join(cache_dir, STAMP_NAME)
    if _read_stamp(stamp) == digest:
        return os.access(cache_dir, os.W_OK | os.X_OK)
    try:
        names = os.listdir(cache_dir)
    except OSError:  # absent, or not readable
        return False
    stale = [n for n in names if _is_package_entry(n, modules)]
    stale.sort(key=lambda n: not n.endswith(".nbi"))
    for name in stale:
        try:
            os.unlink(os.path.join(cache_dir, name))
        except FileNotFoundError:  # another process cleaned it first
            pass
        except OSError:  # read-only: Numba cannot write here either, so never uses it
            return False
    return _write_stamp(stamp, digest)


def ensure_fresh() -> None:
    """Deletes Numba cache entries of the kernels if any kernel source changed since they were
    written (see the module docstring). Idempotent, safe with read-only directories and with
    concurrent processes; costs a read of the kernel sources (about a millisecond)."""
    global _ensured
    if not os.path.isdir(_KERNELS_DIR):  # e.g. imported from a zip archive: nothing to do
        return
    with _lock:
        provided, user_wide = _cache_roots()
        modules, digest = _sources(_KERNELS_DIR)
        if _ensured == (digest, provided):
            return
        for src_dir, names in modules.items():
            # The directories Numba's locators would pick, in their order: the first writable
            # one is the one Numba uses (it creates it at decoration time, so we may too); the
            # others are only cleaned where they exist (left from other settings or runs).
            candidates = [os.path.join(src_dir, "__pycache__")]
            if provided:
                candidates.insert(0, os.path.join(provided, _cache_subpath(src_dir)))
            if user_wide:
                candidates.append(os.path.join(user_wide, _cache_subpath(src_dir)))
            in_use = False
            for cache_dir in candidates:
                in_use = _refresh(cache_dir, names, digest, create=not in_use) or in_use
        _ensured = (digest, provided)
