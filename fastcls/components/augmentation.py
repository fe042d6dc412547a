"""EDA augmentation of the training rows (`--augment eda`; the operations are `fastcls.augment`'s).

Each training row is kept and joined by `--num-aug` edited copies with its label. Two ways to draw them:
- `--augment-copies fixed` (Wei & Zou 2019's way): drawn once, before training; the copies are rows like any
  other, so the frozen-prefix cache serves them from the second epoch on.
- `--augment-copies fresh`: new copies every epoch, drawn from (seed, epoch, row), so a resumed run redraws the
  same ones. The next epoch's copies are drawn and tokenised in a background thread while this epoch trains. An
  epoch's rows are the originals (rows 0..N-1, the same every epoch) and then its copies; its batches are cut from
  its own lengths. Since copies change every epoch, the frozen-prefix cache is off: no changed row is ever served
  from it.

An epoch is one pass over the originals and their copies: at the same `--epochs` a run sees 1 + num_aug times the
rows of a run without augmentation.
"""
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from fastcls.augment import EdaConfig, SynonymTable, augment_rows
from fastcls.config import TrainConfig
from fastcls.data import Encoded, Example, LengthGroupedBatches, tokenize_examples
from fastcls.errors import ConfigError


def eda_config(cfg: TrainConfig) -> EdaConfig:
    eda = EdaConfig(alpha_sr=cfg.alpha_sr, alpha_ri=cfg.alpha_ri, alpha_rs=cfg.alpha_rs, p_rd=cfg.p_rd,
                    num_aug=cfg.num_aug, ops=tuple(cfg.eda_ops) if cfg.eda_ops is not None else EdaConfig().ops)
    eda.check()
    return eda


@dataclass
class Augmentation:
    """The training rows and how their copies are drawn; `train_for(epoch)` gives an epoch's tokenised rows."""

    rows: list[Example]
    eda: EdaConfig
    synonyms: SynonymTable
    fresh: bool
    seed: int
    tokenize: object  # examples -> Encoded
    waited_seconds: float = 0.0  # time the training loop spent waiting for an epoch's copies

    def __post_init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastcls-eda") if self.fresh else None
        self._drawn: dict[int, Future] = {}
        self._current: tuple[int, Encoded] | None = None

    def rows_for(self, epoch: int) -> list[Example]:
        """The originals, then `num_aug` copies of each (in row order), each copy with its row's label."""
        drawn = augment_rows([row.texts for row in self.rows], self.eda, self.synonyms, self.seed, epoch)
        copies = [Example(texts, self.rows[i].label, self.rows[i].line, self.rows[i].source)
                  for texts, i in zip(drawn.texts, drawn.source.tolist(), strict=True)]
        return self.rows + copies

    def _encode(self, epoch: int) -> Encoded:
        return self.tokenize(self.rows_for(epoch))

    def train_for(self, epoch: int, draw_next: bool = True) -> Encoded:
        """Epoch `epoch`'s rows (fixed copies: epoch 0's, every epoch). Fresh copies: with `draw_next`, the next
        epoch's are then drawn in the background."""
        epoch = epoch if self.fresh else 0
        if self._current is not None and self._current[0] == epoch:
            return self._current[1]
        if self._pool is None:
            encoded = self._encode(epoch)
        else:
            future = self._drawn.pop(epoch, None)
            if future is None:  # the first epoch (drawn while the data is read), or a resumed one
                encoded = self._encode(epoch)
            else:
                start = time.perf_counter()
                encoded = future.result()
                self.waited_seconds += time.perf_counter() - start
            self._drawn = {epoch + 1: self._pool.submit(self._encode, epoch + 1)} if draw_next else {}
        self._current = (epoch, encoded)
        return encoded

    def describe(self) -> str:
        how = "new copies every epoch" if self.fresh else "copies drawn once"
        copies = f"{self.eda.num_aug} {'copy' if self.eda.num_aug == 1 else 'copies'} per row"
        coverage = self.synonyms.coverage(text for row in self.rows for text in row.texts).describe()
        return f"EDA: {copies} ({', '.join(self.eda.ops)}), {how}; synonyms: {self.synonyms.source}, {coverage}"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class FreshEpochBatches:
    """Length-grouped batches of each epoch's own rows: fresh copies change the rows' lengths every epoch. The
    number of rows, and so of batches, is the same every epoch."""

    def __init__(self, augmentation: Augmentation, batch_size: int, group_size: int, seed: int):
        self.augmentation, self.batch_size, self.group_size, self.seed = augmentation, batch_size, group_size, seed
        self.rows = len(augmentation.rows) * (1 + augmentation.eda.num_aug)

    def batches(self, epoch: int) -> list[list[int]]:
        lengths = self.augmentation.train_for(epoch).lengths
        return LengthGroupedBatches(lengths, self.batch_size, group_size=self.group_size, seed=self.seed).batches(epoch)

    def __len__(self) -> int:
        return math.ceil(self.rows / self.batch_size)


def augmentation_for(cfg: TrainConfig, rows: list[Example], tokenizer, label_map) -> Augmentation | None:
    """The run's augmentation (None without --augment); errors name the flag at fault."""
    if cfg.augment == "none":
        given = [name for name in ("synonyms", "eda_ops") if getattr(cfg, name) is not None]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is for --augment eda")
        return None
    synonyms = SynonymTable.load(cfg.synonyms)
    return Augmentation(rows, eda_config(cfg), synonyms, cfg.augment_copies == "fresh", cfg.seed,
                        lambda examples: tokenize_examples(examples, tokenizer, cfg.max_length, label_map=label_map))

