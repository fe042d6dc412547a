"""Builds the C++ kernels: one pybind11 module per CPU variant, fastcls._C_<variant>.

On x86-64 the kernels are compiled for a baseline target and for AVX2, AVX-512 and AVX-512 with its bf16
instructions; at import fastcls.ops.cpu_variant loads the best variant the CPU runs (or FASTCLS_CPU_VARIANT's).
Elsewhere (aarch64...) one plain build, named baseline. The modules bind plain pointers, not torch tensors, so
they need no torch headers at build time and survive torch upgrades.

A failed build leaves fastcls usable on its PyTorch reference paths and says so loudly at install time;
FASTCLS_REQUIRE_CPP=1 makes any failed variant fail the install instead (CI sets it).
"""
import os
import platform
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from glob import glob

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # no pybind11: build nothing, run on the reference paths
    Pybind11Extension = None

# GCC 12's AVX-512 intrinsic headers trip its own uninitialized-variable warnings tens of thousands of times
# (GCC bug 105593), which would bury a real message in `pip install -v`'s log.
BASE_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]
SOURCES = sorted(glob("csrc/*.cpp"))
HEADERS = sorted(glob("csrc/*.h"))
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
# name -> target flags; the names and their order (worst to best) are fastcls/ops/cpu_variant.py's VARIANTS.
# The baseline is plain x86-64, which every x86-64 CPU runs: x86-64-v2 would add SSE4.2 and POPCNT, which these
# float loops do not use, and leave out the old CPUs a baseline exists for.
VARIANTS = {
    "baseline": ["-march=x86-64"],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4"],
    "avx512_bf16": ["-march=x86-64-v4", "-mavx512bf16"],
} if X86_64 else {"baseline": []}
# FASTCLS_CPU_VARIANTS=baseline,avx512 builds those alone: a quicker install where the rest will not run (a GPU
# machine's check, a developer's rebuild); fastcls.ops.cpu_variant then picks among what was built
if os.environ.get("FASTCLS_CPU_VARIANTS"):
    wanted = os.environ["FASTCLS_CPU_VARIANTS"].split(",")
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        sys.exit(f"fastcls: FASTCLS_CPU_VARIANTS names {', '.join(unknown)}; the variants are {', '.join(VARIANTS)}")
    VARIANTS = {name: flags for name, flags in VARIANTS.items() if name in wanted}

REQUIRE_CPP = os.environ.get("FASTCLS_REQUIRE_CPP") == "1"


def warn_loudly(failures: list[str]) -> None:
    if "baseline" in failures:
        meaning = "fastcls will run every CPU op on its PyTorch reference (slower, same results)"
    else:
        meaning = "fastcls will run the best variant that did build on CPUs that have a missing one"
    rule = "=" * 100
    print(textwrap.dedent(f"""
        {rule}
        fastcls: WARNING: the C++ kernels did not build for the CPU variant(s) {', '.join(failures)}.
        {meaning}; `fastcls info` shows what runs each op.
        To get the kernels: install a C++17 compiler with OpenMP (g++ >= 11 or clang >= 14, and libgomp) and
        pybind11, then reinstall; the compiler's messages are above. Set FASTCLS_REQUIRE_CPP=1 to make a failed
        build fail the install instead.
        {rule}
        """), file=sys.stderr)


class VariantBuild(build_ext):
    """Compiles every variant's objects in one pool (both cores of a small CI machine busy, the biggest sources
    first so that the longest compile starts early), then links each variant; a variant that fails is left out."""

    def build_extensions(self):
        self.check_extensions_list(self.extensions)
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            order = list(VARIANTS)
            pending = sorted(((ext, source) for ext in self.extensions for source in ext.sources),
                             key=lambda job: (-os.path.getsize(job[1]), -order.index(job[0].variant)))
            # (variant, source) -> the future of its object's path
            jobs = {(ext.variant, source): pool.submit(self.compile_object, ext, source) for ext, source in pending}
            failures = [ext.variant for ext in self.extensions if not self.link(ext, jobs)]
        if failures:
            # the variants that did build are the outputs to install (or, editable, to copy into the source tree)
            self.extensions = [ext for ext in self.extensions if ext.variant not in failures]
            warn_loudly(failures)
            if REQUIRE_CPP:
                sys.exit(f"fastcls: FASTCLS_REQUIRE_CPP=1 and the C++ kernels of {', '.join(failures)} did not build")

    def get_source_files(self):
        # what sdist takes for the extensions: the headers too (setuptools < 69 leaves Extension.depends out)
        return list(dict.fromkeys(super().get_source_files() + [h for ext in self.extensions for h in ext.depends]))

    def compile_object(self, ext, source):
        return self.compiler.compile([source], output_dir=os.path.join(self.build_temp, ext.variant),
                                     macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                                     extra_postargs=ext.extra_compile_args, depends=ext.depends)[0]

    def link(self, ext, jobs) -> bool:
        """Links ext from its objects; False (and the compiler's error) on a failure."""
        try:
            objects = [jobs[ext.variant, source].result() for source in ext.sources]
            self.compiler.link_shared_object(
                objects, self.get_ext_fullpath(ext.name), libraries=self.get_libraries(ext),
                library_dirs=ext.library_dirs, runtime_library_dirs=ext.runtime_library_dirs,
                extra_postargs=ext.extra_link_args, export_symbols=self.get_export_symbols(ext), debug=self.debug,
                build_temp=self.build_temp, target_lang="c++")
            return True
        except Exception as err:  # compiler missing, flag unsupported, OpenMP absent...
            print(f"fastcls: building {ext.name} failed: {err}", file=sys.stderr)
            return False


def variant_extension(variant: str):
    ext = Pybind11Extension(f"fastcls._C_{variant}", SOURCES, include_dirs=["csrc"], depends=HEADERS,
                            define_macros=[("FASTCLS_MODULE", f"_C_{variant}")],
                            extra_compile_args=BASE_FLAGS + VARIANTS[variant], extra_link_args=["-fopenmp"])
    ext.variant = variant
    return ext


if Pybind11Extension is None:
    warn_loudly(list(VARIANTS))
    if REQUIRE_CPP:
        sys.exit("fastcls: FASTCLS_REQUIRE_CPP=1 and pybind11 is not installed")
ext_modules = [] if Pybind11Extension is None else [variant_extension(v) for v in VARIANTS]

setup(ext_modules=ext_modules, cmdclass={"build_ext": VariantBuild})
