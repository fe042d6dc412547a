"""EDA's settings (Wei & Zou 2019, "EDA: Easy Data Augmentation Techniques..."), with the paper's defaults."""
from dataclasses import dataclass

from fastcls.errors import ConfigError

OPS = ("sr", "ri", "rs", "rd")  # synonym replacement, random insertion, random swap, random deletion


@dataclass(frozen=True)
class EdaConfig:
    alpha_sr: float = 0.1  # synonym replacement: n = max(1, int(alpha * words)) edits
    alpha_ri: float = 0.1  # random insertion
    alpha_rs: float = 0.1  # random swap
    p_rd: float = 0.1  # random deletion: each word deleted with probability p
    num_aug: int = 4  # augmented copies per row (the original is kept besides them by the caller)
    ops: tuple[str, ...] = OPS  # the operations to draw copies from

    def check(self) -> None:
        for flag, value in (("--alpha-sr", self.alpha_sr), ("--alpha-ri", self.alpha_ri),
                            ("--alpha-rs", self.alpha_rs), ("--p-rd", self.p_rd)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ConfigError(f"{flag} must be in [0, 1], got {value!r}")
        if isinstance(self.num_aug, bool) or not isinstance(self.num_aug, int) or self.num_aug < 1:
            raise ConfigError(f"--num-aug must be a whole number of at least 1, got {self.num_aug!r}")
        if not self.ops:
            raise ConfigError(f"--eda-ops must name at least one of {', '.join(OPS)}")
        for op in self.ops:
            if op not in OPS:
                raise ConfigError(f"--eda-ops: unknown operation {op!r} (choose from {', '.join(OPS)})")
            if list(self.ops).count(op) > 1:
                raise ConfigError(f"--eda-ops names {op!r} twice")
