"""fastcls: a kernel-level engine for fine-tuning transformer encoders for sequence classification."""
__version__ = "0.1.0"
