"""Test machinery that never ships in the wheel: the CUDA host emulator (`cuda_host`, with its
header `sortgrad_emulation.cuh`) and the patch that makes Numba's CUDA simulator thread-safe
(`numba_simulator`).

Test files import it as `from _emulation import cuda_host` (pytest's default "prepend" import
mode puts tests/ on sys.path, for the test files and for tests/conftest.py).
"""
