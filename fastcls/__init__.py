"""fastcls: a kernel-level engine for fine-tuning transformer encoders for sequence classification."""
__version__ = "0.1.0"


def __getattr__(name):
    # patching imports transformers: loaded on first use, so that `import fastcls` stays light
    if name in ("patch", "unpatch"):
        from fastcls import patching

        return getattr(patching, name)
    raise AttributeError(f"module 'fastcls' has no attribute {name!r}")
