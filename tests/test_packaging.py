"""Packaging of the C++ kernels: the sdist carries every source the build needs, the wheel built from it every CPU
variant's module, and it installs into a fresh venv whose `fastcls info` runs the C++ backend; every CPU variant this
machine runs matches the PyTorch reference (the existing kernel tests, run with the variant forced); a forced
variant the CPU lacks is one error line."""
import glob
import importlib.util
import os
import platform
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastcls.errors import ConfigError
from fastcls.ops import cpu_variant, dispatch

ROOT = Path(__file__).resolve().parents[1]
BUILT_VARIANTS = cpu_variant.VARIANTS if platform.machine().lower() in ("x86_64", "amd64") else ("baseline",)
needs_cpp = pytest.mark.skipif(dispatch.cpp_ext is None, reason=f"C++ kernels not built: {dispatch.CPP_ERROR}")


def run(*command, **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def fresh_venv(path: Path) -> Path:
    """A venv that sees this environment's packages (torch, pybind11, setuptools...) but not its fastcls, which an
    editable install exposes through a finder that only this environment's own site-packages runs."""
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path))
    python = path / "bin" / "python"
    site = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "outer_environment.pth").write_text("\n".join(ours) + "\n")
    return python


@needs_cpp
def test_sdist_builds_a_wheel_with_every_variant_that_installs_into_a_fresh_venv(tmp_path):
    # One compile: pip builds the wheel from the sdist, which is what `pip install <sdist>` does before installing
    # it and what `python -m build` does for its wheel.
    env = {**os.environ, "FASTCLS_REQUIRE_CPP": "1"}
    env.pop("FASTCLS_CPU_VARIANTS", None)  # every variant
    make_sdist = f"import setuptools.build_meta as backend; print(backend.build_sdist({str(tmp_path)!r}))"
    sdist = tmp_path / run(sys.executable, "-c", make_sdist, cwd=ROOT, env=env).strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = [str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / "csrc" / "*.[ch]*"))
              + glob.glob(str(ROOT / "kernels" / "*.py")) + [str(ROOT / "setup.py"), str(ROOT / "pyproject.toml")]]
    assert sorted(set(needed) - names) == []

    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-w",
        str(tmp_path / "wheels"), str(sdist), env=env)
    (wheel,) = (tmp_path / "wheels").glob("fastcls-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        modules = [name for name in archive.namelist() if name.startswith("fastcls/_C_")]
    assert sorted(name.split(".")[0] for name in modules) == sorted(f"fastcls/_C_{v}" for v in BUILT_VARIANTS)

    python = fresh_venv(tmp_path / "venv")
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel), env=env)
    # from a folder outside the repository: fastcls is the venv's own, and `fastcls info` shows the C++ backend
    # with the variant it picked
    location = run(str(python), "-c", "import fastcls; print(fastcls.__file__)", cwd=tmp_path).strip()
    assert Path(location).is_relative_to(tmp_path / "venv"), location
    info = run(str(tmp_path / "venv" / "bin" / "fastcls"), "info", cwd=tmp_path)
    assert "C++ kernels   built, CPU variant " in info, info
    assert "cpu: cpp (fp32, bf16)" in next(line for line in info.splitlines() if line.startswith("dropout ")), info


# The kernel tests that compare each C++ op with the PyTorch reference on odd shapes and dtypes.
REFERENCE_TESTS = [
    # fp32 (all but "plain": its 1M-element tensor is the reference's slow case, not the kernel's), bf16+master
    "tests/test_adamw.py::test_matches_torch_adamw", "tests/test_adamw.py::test_master_weights",
    "tests/test_cross_entropy.py::test_matches_torch", "tests/test_cross_entropy.py::test_ignore_index",
    "tests/test_cross_entropy.py::test_weight_and_label_smoothing",  # fp32/bf16/fp16 logits
    "tests/test_multi_task_head.py::test_matches_torch_per_task_sum",
    "tests/test_dropout.py::test_every_backend_draws_the_reference_mask",
    "tests/test_dropout_add_layer_norm.py::test_dropout_add_layer_norm_matches_the_reference_mask",
    "tests/test_dropout_add_layer_norm.py::test_layer_norm_dropout_matches_the_reference_mask",
    "tests/test_dropout_add_layer_norm.py::test_no_dropout_is_torch_unfused",
    "tests/test_dropout_add_layer_norm.py::test_cpp_streamed_outputs_match_the_reference",
    "tests/test_dropout_add_layer_norm.py::test_cpp_bf16_copy_is_the_output_rounded",
    "tests/test_dropout_add_layer_norm.py::test_the_cpp_recovery_check_answers_as_torchs",
    "tests/test_bias_gelu.py::test_cpp_kernels_write_the_weight_gradients_layouts",
]


@needs_cpp
@pytest.mark.parametrize("variant", cpu_variant.VARIANTS)
def test_each_variant_matches_the_reference(variant):
    if variant not in BUILT_VARIANTS or not dispatch.cpp_ext.cpu_supports(variant):
        pytest.skip(f"this machine does not run the {variant} kernels")
    if importlib.util.find_spec(f"fastcls._C_{variant}") is None:
        pytest.skip(f"the {variant} kernels were left out of this install (FASTCLS_CPU_VARIANTS)")
    # a forced variant that did not load would stop the run at import, so passing tests ran this variant
    env = {**os.environ, cpu_variant.ENV: variant, "FASTCLS_BACKEND": ""}
    out = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpp and not plain",
              *REFERENCE_TESTS, cwd=ROOT, env=env)
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, out[-3000:]


def fake_build(monkeypatch, supported: tuple[str, ...]) -> list[str]:
    """cpu_variant.load on a CPU that runs `supported`, every variant built; returns the modules it imports."""
    imported = []

    def import_module(name):
        imported.append(name)
        return SimpleNamespace(cpu_supports=lambda variant: variant in supported)

    monkeypatch.setattr(cpu_variant.importlib, "import_module", import_module)
    monkeypatch.setattr(cpu_variant.importlib.util, "find_spec", lambda name: object())
    return imported


def test_the_best_variant_the_cpu_runs_is_loaded(monkeypatch):
    monkeypatch.delenv(cpu_variant.ENV, raising=False)
    imported = fake_build(monkeypatch, ("baseline", "avx2"))
    build = cpu_variant.load()
    assert (build.variant, build.reason, imported) == ("avx2", "cpu supports it", ["fastcls._C_baseline",
                                                                                    "fastcls._C_avx2"])
    monkeypatch.setenv(cpu_variant.ENV, "baseline")
    assert cpu_variant.load()[1:] == ("baseline", "forced by FASTCLS_CPU_VARIANT")


@pytest.mark.parametrize("forced, message", [
    ("avx512_bf16", "FASTCLS_CPU_VARIANT=avx512_bf16: this CPU does not support it; it runs baseline, avx2"),
    ("avx3", "FASTCLS_CPU_VARIANT=avx3: not a CPU variant; use one of baseline, avx2, avx512, avx512_bf16"),
])
def test_a_forced_variant_the_cpu_lacks_is_never_imported(monkeypatch, forced, message):
    monkeypatch.setenv(cpu_variant.ENV, forced)
    imported = fake_build(monkeypatch, ("baseline", "avx2"))
    with pytest.raises(ConfigError) as raised:
        cpu_variant.load()
    assert (str(raised.value), imported) == (message, ["fastcls._C_baseline"])


@needs_cpp
def test_cli_names_a_forced_variant_the_cpu_lacks_in_one_line(tmp_path):
    lacking = next((v for v in cpu_variant.VARIANTS if not dispatch.cpp_ext.cpu_supports(v)), "avx3")
    result = subprocess.run([sys.executable, "-m", "fastcls", "info"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, cpu_variant.ENV: lacking})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"fastcls info: error: FASTCLS_CPU_VARIANT={lacking}: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_build_refuses_an_unknown_variant_in_one_line():
    result = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "FASTCLS_CPU_VARIANTS": "baseline,avx3"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"fastcls: FASTCLS_CPU_VARIANTS names avx3; the variants are {', '.join(BUILT_VARIANTS)}")
