"""fastcls on the oldest versions pyproject.toml allows: the lower bounds of its dependencies (torch's excepted: PyPI's
Linux torch wheels are multi-GB CUDA builds) pip-installed from PyPI into a venv layered over this environment, which
then runs the tests that lean on transformers' code most: the encoder against the model's own forward, patching,
short training runs and their exports, and the bundled model loaded by fastcls's loader. About 2 minutes."""
import os
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_encoder.py::test_both_layouts_match_the_models_own_forward_in_eval_mode",
    "tests/test_patching.py::test_patched_model_in_eval_mode_matches_and_keeps_its_state_dict",
    "tests/test_patching.py::test_fused_blocks_give_the_same_logits_and_state_dict",
    "tests/test_patching.py::test_bundled_minilm_patched_in_eval_mode_matches",
    "tests/test_train.py::test_run_folder_and_export_load_in_transformers_with_the_same_predictions",
    "tests/test_pooling.py::test_mean_pooled_run_folder_and_export_load_with_their_pooling",
]
# the bundled MiniLM's checkpoint holds a `position_ids` buffer that transformers before 5.6 reports as unexpected
LOAD_BUNDLED = ("from fastcls.config import bundled_model_path\n"
                "from fastcls.models.loading import load_encoder, load_tokenizer\n"
                "load_encoder(bundled_model_path()); load_tokenizer(bundled_model_path())\n")


def lower_bounds() -> dict[str, str]:
    """name -> the version of its `>=` bound, for each core dependency but torch."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert floors, f"{line}: a dependency without a tested lower bound"
        if requirement.name != "torch":
            bounds[requirement.name] = floors[0]
    return bounds


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/transformers/", timeout=10).close()
        return True
    except OSError:
        return False


def test_the_oldest_supported_dependencies_pass_the_transformers_facing_tests(tmp_path):
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: the oldest supported versions cannot be installed")
    venv = tmp_path / "oldest"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    python = str(venv / "bin" / "python")
    # this environment's packages (fastcls itself, torch, pytest) after the venv's own, which shadow them
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                          capture_output=True, text=True).stdout.strip()
    outer = sysconfig.get_path("purelib")
    Path(site, "zz_outer_environment.pth").write_text(f"import site; site.addsitedir({outer!r})\n")
    bounds = lower_bounds()
    # transformers imports the `kernels` package where installed; this environment's may need a newer
    # huggingface-hub than the oldest, so the venv gets the version transformers' own extra names
    pins = [f"{name}=={version}" for name, version in bounds.items() if name != "transformers"]
    pins.append(f"transformers[kernels]=={bounds['transformers']}")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": ""}
    versions = subprocess.run(
        [python, "-c", "import importlib.metadata as m, sys\n"
                       "for name in sys.argv[1:]: print(name, m.version(name))\n", *bounds],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert {name: Version(v) for name, v in zip(versions[::2], versions[1::2])} == \
        {name: Version(v) for name, v in bounds.items()}
    loaded = subprocess.run([python, "-c", LOAD_BUNDLED], cwd=ROOT, env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    tests = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-5000:]
    assert " passed" in tests.stdout and "skipped" not in tests.stdout, tests.stdout[-2000:]
