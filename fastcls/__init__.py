"""fastcls: a kernel-level engine for fine-tuning transformer encoders for sequence classification.

    import fastcls
    result = fastcls.train(train="train.csv", dev="dev.csv", output="runs/x")
    clf = fastcls.load(result.output)
    clf.predict(["a gripping film", "dull"])

The names below load on first use, so that `import fastcls` stays light (torch and transformers are imported
when something needs them).
"""
__version__ = "0.1.0"

from fastcls import console as _console

_console.install_default()  # INFO lines on stdout until the application configures logging (fastcls.console)

_EXPORTS = {
    "train": "fastcls.api",
    "load": "fastcls.api",
    "TrainConfig": "fastcls.config",
    "TrainResult": "fastcls.trainer",
    "Classifier": "fastcls.inference",
    "Callback": "fastcls.components.callbacks",
    "TrainState": "fastcls.components.callbacks",
    "EncoderClassifier": "fastcls.models.classifier",
    "patch": "fastcls.patching",
    "unpatch": "fastcls.patching",
    "UserError": "fastcls.errors",
    "ConfigError": "fastcls.errors",
    "DataError": "fastcls.errors",
    "ModelLoadError": "fastcls.errors",
    "TrainingError": "fastcls.errors",
    "TrainingInterrupted": "fastcls.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastcls' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
