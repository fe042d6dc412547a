"""Data-parallel scaling: the same global batch trained by 1 process and by N torchrun processes, one table.

    python benchmarks/scaling.py [--procs 2] [--device cpu|cuda] [--rows 2000] [--steps 40] [--batch 32]

Every run fine-tunes the bundled all-MiniLM-L6-v2 on the first --rows SST-2 training rows for --steps optimizer
steps at a global batch of --batch rows (per process: --batch / N), max length 128, no evaluation, each in its
own process tree, and reads samples/s from the run's trainer_state.json. On the CPU the single process uses all
--procs cores as torch threads and each of the N processes one, so both use the same cores; on CUDA each process
takes its own GPU (`--procs` GPUs). The ranks' padding and forward-time spread come from the same file.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


def _run(procs: int, args, data: Path, out: Path) -> dict:
    flags = ["train", "--train", str(data), "--output", str(out), "--max-steps", str(args.steps),
             "--batch-size", str(args.batch // procs), "--max-length", "128", "--device", args.device,
             "--log-every", str(args.steps), "--warmup", "0.06"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if procs == 1:
        env["OMP_NUM_THREADS"] = str(args.procs if args.device == "cpu" else 1)
        command = [sys.executable, "-m", "fastcls", *flags]
    else:
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   "-m", "fastcls", *flags]
    subprocess.run(command, check=True, env=env, cwd=out.parent, stdout=subprocess.DEVNULL)
    return json.loads((out / "trainer_state.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = SST2.read_text().splitlines(keepends=True)
        data = tmp / "train.tsv"
        data.write_text("".join(lines[: args.rows + 1]))
        rows = []
        for procs in (1, args.procs):
            state = _run(procs, args, data, tmp / f"run{procs}")
            rows.append((procs, state))
    base = rows[0][1]["train_samples_per_s"]
    print(f"| processes ({args.device}) | global batch | samples/s | vs 1 process | padding per rank | "
          "forward spread |")
    print("| ---: | ---: | ---: | ---: | --- | ---: |")
    for procs, state in rows:
        ranks = state.get("distributed") or {}
        print(f"| {procs} | {args.batch} | {state['train_samples_per_s']:.1f} | "
              f"{state['train_samples_per_s'] / base:.2f}x | {ranks.get('padding_fraction_per_rank', '-')} | "
              f"{ranks.get('forward_spread', '-')} |")


if __name__ == "__main__":
    main()
