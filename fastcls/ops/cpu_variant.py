"""Which build of the C++ kernels this process runs: the best CPU variant the machine supports, or the one
FASTCLS_CPU_VARIANT names.

setup.py compiles the kernels once per variant as fastcls._C_<variant>: on x86-64 baseline (-march=x86-64),
avx2 (x86-64-v3), avx512 (x86-64-v4) and avx512_bf16 (x86-64-v4 with AVX512-BF16); elsewhere baseline alone
(no -march). The baseline module asks the CPU and the OS what they run, and a variant they do not is never
imported: its first instruction could be illegal.
"""
import importlib
import importlib.util
import os
from types import ModuleType
from typing import NamedTuple

from fastcls.errors import ConfigError

VARIANTS = ("baseline", "avx2", "avx512", "avx512_bf16")  # worst to best, as setup.py builds them
ENV = "FASTCLS_CPU_VARIANT"


class CppBuild(NamedTuple):
    """The loaded module of the chosen variant (None where none is usable), its name, and why it (or none)."""
    module: ModuleType | None
    variant: str | None
    reason: str


def load() -> CppBuild:
    """Imports the variant FASTCLS_CPU_VARIANT names, else the best one built that the CPU runs; ConfigError on a
    forced variant that is unknown, not built, or beyond this CPU."""
    try:
        baseline = importlib.import_module("fastcls._C_baseline")
    except ImportError as err:  # the C++ build failed or was skipped at install
        return CppBuild(None, None, str(err))
    supported = [v for v in VARIANTS if baseline.cpu_supports(v)]
    built = [v for v in supported if importlib.util.find_spec(f"fastcls._C_{v}") is not None]
    forced = os.environ.get(ENV)
    if forced:
        if forced not in VARIANTS:
            raise ConfigError(f"{ENV}={forced}: not a CPU variant; use one of {', '.join(VARIANTS)}")
        if forced not in supported:
            raise ConfigError(f"{ENV}={forced}: this CPU does not support it; it runs {', '.join(supported)}")
        if forced not in built:
            raise ConfigError(f"{ENV}={forced}: its C++ kernels were not built in this install; built: "
                              f"{', '.join(built)}")
        chosen, reason = forced, f"forced by {ENV}"
    else:
        chosen = built[-1]
        reason = "cpu supports it" if chosen == supported[-1] else \
            f"the best built; cpu also supports {', '.join(supported[supported.index(chosen) + 1:])}"
    return CppBuild(importlib.import_module(f"fastcls._C_{chosen}"), chosen, reason)
