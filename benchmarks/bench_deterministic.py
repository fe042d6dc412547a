"""What `--deterministic` costs on the CPU, step by step: two runs of the same small BERT-like job (random
weights, 4 layers of width 256, the bundled SST-2 rows, batch 16, so the same batches in the same order), one
with the mode on at odd steps and off at even ones, the other the reverse. Each step's time with the mode on is
divided by the same step's (same batch) time with it off, in the other run; the median of those ratios is the
cost, robust to the bursts of a shared machine.

    python benchmarks/bench_deterministic.py [--steps 60] [--fill-uninitialized-memory]

--fill-uninitialized-memory keeps what torch.use_deterministic_algorithms also turns on by default, NaN-filling
every new tensor (fastcls's mode turns it off).
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

import fastcls
from fastcls.config import bundled_model_path
from fastcls.models.loading import load_tokenizer


class Alternate(fastcls.Callback):
    """Sets the mode for the next step (on where (step + parity) is odd) and records each step's seconds."""

    def __init__(self, parity: int, fill: bool):
        self.parity, self.fill, self.seconds, self.on = parity, fill, [], []

    def _set(self, step: int) -> None:
        on = (step + self.parity) % 2 == 1
        torch.use_deterministic_algorithms(on)
        torch.utils.deterministic.fill_uninitialized_memory = self.fill
        self.on.append(on)
        self.tick = time.perf_counter()

    def on_train_begin(self, state):
        self._set(0)

    def on_step_end(self, state):
        self.seconds.append(time.perf_counter() - self.tick)
        self._set(state.step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--fill-uninitialized-memory", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-deterministic-"))
    tokenizer = load_tokenizer(bundled_model_path())
    config = AutoConfig.for_model("bert", vocab_size=tokenizer.vocab_size, hidden_size=256, num_hidden_layers=4,
                                  num_attention_heads=4, intermediate_size=1024, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp / "encoder")
    tokenizer.save_pretrained(tmp / "encoder")
    runs = []
    for parity in (0, 1):
        callback = Alternate(parity, args.fill_uninitialized_memory)
        fastcls.train(model=str(tmp / "encoder"), dev=None, output=str(tmp / f"run{parity}"), max_steps=args.steps,
                      batch_size=16, max_length=128, deterministic=False, log_every=args.steps, callbacks=[callback])
        runs.append(callback)
    first, second = runs
    ratios = [(a / b if on else b / a) for a, b, on in zip(first.seconds, second.seconds, first.on, strict=False)][2:]
    on_total = sum(a if on else b for a, b, on in zip(first.seconds, second.seconds, first.on, strict=False))
    off_total = sum(b if on else a for a, b, on in zip(first.seconds, second.seconds, first.on, strict=False))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(ratios)} step pairs (the first two, "
          f"warm-up, left out): median on/off {statistics.median(ratios):.3f}, quartiles "
          f"{statistics.quantiles(ratios, n=4)[0]:.3f}-{statistics.quantiles(ratios, n=4)[2]:.3f}; totals "
          f"{on_total:.2f} s on, {off_total:.2f} s off")


if __name__ == "__main__":
    main()
