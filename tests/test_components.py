import json

import pytest
import torch
from torch import nn

from fastcls.components.checkpoint import save_json_atomic, save_weights_atomic
from fastcls.components.metrics import classification_report
from fastcls.components.optimizer import param_groups
from fastcls.config import TrainConfig, load_config_file


def test_metrics_against_hand_counts():
    true = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 1, 0, 1, 1, 2, 0, 2, 1])
    r = classification_report(pred, true, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(6 / 9)
    # a: tp 2, predicted 3, support 3; b: tp 2, predicted 4, support 2; c: tp 2, predicted 2, support 4
    f1 = [2 * (2 / 3) * (2 / 3) / (4 / 3), 2 * 0.5 * 1.0 / 1.5, 2 * 1.0 * 0.5 / 1.5]
    assert r["per_class"]["a"]["f1"] == pytest.approx(f1[0])
    assert r["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert r["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert r["per_class"]["c"]["support"] == 4
    assert r["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_no_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[3].weight.requires_grad_(False)
    decay, plain = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    assert ids(decay["params"]) == {id(model[0].weight), id(model[1].weight)}
    assert ids(plain["params"]) == {id(model[1].bias), id(model[2].weight), id(model[2].bias), id(model[3].bias)}


def test_atomic_writes_keep_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_weights_atomic({"a": torch.randn(3)}, path)
    before = path.read_bytes()

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr("fastcls.components.checkpoint.save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_weights_atomic({"a": torch.randn(3)}, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    save_json_atomic({"x": 1}, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == {"x": 1}


def test_config_file_and_checks(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 3e-5\nbatch-size = 16\ntext_columns = ["title", "description"]\n')
    assert load_config_file(toml) == {"lr": 3e-5, "batch_size": 16, "text_columns": ["title", "description"]}
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rate": 1}')
    with pytest.raises(ValueError, match="unknown settings.*learning_rate"):
        load_config_file(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_config_file(broken)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 3e-5\nbatch-size: 16\ntext_columns: [title, description]\n")  # 3e-5: a number
    assert load_config_file(yaml_file) == {"lr": 3e-5, "batch_size": 16, "text_columns": ["title", "description"]}
    typed = tmp_path / "typed.yml"
    typed.write_text("batch_size: sixteen\n")
    with pytest.raises(ValueError, match=r"typed.yml: --batch-size \(setting 'batch_size'\) must be int, got str"):
        load_config_file(typed)
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("lr: 1e-5\nbatch_size: [16\n")
    with pytest.raises(ValueError, match="broken.yaml line 3 is not valid YAML"):
        load_config_file(broken_yaml)
    with pytest.raises(ValueError, match="--batch-size"):
        TrainConfig(batch_size=0).resolve()
    with pytest.raises(ValueError, match="--patience needs --dev"):
        TrainConfig(train="x.tsv", patience=2).resolve()
