"""Triton kernels, installed as `fastcls.kernels` (one module per op).

Run from the repository root (`python -m pytest`, `python -m fastcls`), this folder is also importable as a
top-level `kernels`: the name of Hugging Face's kernels package, which transformers imports. Imported under that
name, the module hands the name over to that package, so the repository root never shadows it."""
if __name__ == "kernels":
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = sys.path[:]
    del sys.modules[__name__]
    sys.path[:] = [p for p in _path if os.path.abspath(p or os.curdir) != _root]
    try:
        # the import system returns whatever sys.modules holds under the name once this file has run
        sys.modules[__name__] = importlib.import_module("kernels")
    finally:
        sys.path[:] = _path
