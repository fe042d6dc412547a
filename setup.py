"""Builds the optional C++ kernels (fastcls._C).

The extension binds plain pointers, not torch tensors, so it needs no torch headers at build time and
survives torch upgrades. A failed build leaves fastcls usable on its PyTorch reference paths:
`fastcls info` then reports the reference backend for every CPU op.
"""
import sys
from glob import glob

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # no pybind11: build nothing, run on the reference paths
    Pybind11Extension = None

BASE_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast"]
# The kernels are compiled on the machine that runs them; -march=native is dropped where unsupported.
NATIVE_FLAGS = ["-march=native"]


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        base_args = list(ext.extra_compile_args)
        for extra in (NATIVE_FLAGS, []):
            ext.extra_compile_args = base_args + extra
            try:
                super().build_extension(ext)
                return
            except Exception as err:  # compiler missing, flag unsupported, OpenMP absent...
                print(f"fastcls: building {ext.name} with {extra or 'portable flags'} failed: {err}", file=sys.stderr)
        print("fastcls: C++ kernels not built; CPU ops fall back to the PyTorch reference", file=sys.stderr)


ext_modules = []
if Pybind11Extension is not None:
    ext_modules.append(
        Pybind11Extension(
            "fastcls._C",
            sorted(glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            extra_compile_args=BASE_FLAGS,
            extra_link_args=["-fopenmp"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
