"""EDA augmentation inside training (`--augment eda`, fastcls/components/augmentation.py): the rows each epoch
trains on, fixed and fresh copies, the frozen-prefix cache, and the flags' errors. The operations themselves are
tested in test_augment.py."""
import json

import numpy as np
import pytest
from tiny import tiny_run_inputs

import fastcls
from fastcls.cli import main
from fastcls.components.training_data import read_training_data
from fastcls.config import TrainConfig
from fastcls.errors import ConfigError
from fastcls.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("augmentation"), 24, seed=3)


def config(tiny_dir, tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(model=str(tiny_dir / "encoder"), train=str(tiny_dir / "train.tsv"),
                                 dev=str(tiny_dir / "train.tsv"), output=str(tmp_path / "run"), batch_size=8,
                                 seed=4, log_every=1, augment="eda", num_aug=2), **overrides}).resolve()


def rows_of(encoded) -> list[tuple]:
    return [tuple(encoded.row(i).tolist()) for i in range(len(encoded))]


def test_fixed_copies_are_drawn_once_and_keep_their_rows_labels(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path, augment_copies="fixed")
    data = read_training_data(cfg, load_tokenizer(cfg.model))
    assert len(data.train) == 24 * 3
    assert data.train_for(0) is data.train_for(5) is data.train
    original = data.train.labels[:24]
    source = np.repeat(np.arange(24), 2)  # each row's copies follow the originals, in row order
    assert (data.train.labels[24:] == original[source]).all()
    assert rows_of(data.train)[24:] != [rows_of(data.train)[i] for i in source]  # the copies are edited
    assert len(data.batches(cfg, 1)) == 9


def test_fresh_copies_change_every_epoch_and_replay_from_the_seed(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path)
    data = read_training_data(cfg, load_tokenizer(cfg.model))
    again = read_training_data(cfg, load_tokenizer(cfg.model))
    epochs = [rows_of(data.train_for(e)) for e in range(3)]
    assert all(len(rows) == 72 for rows in epochs)
    assert epochs[0][:24] == epochs[1][:24] == epochs[2][:24]  # the originals, the same every epoch
    assert epochs[0][24:] != epochs[1][24:] != epochs[2][24:]
    assert [rows_of(again.train_for(e)) for e in (2, 0, 1)] == [epochs[2], epochs[0], epochs[1]]  # any order
    batches = data.batches(cfg, 1)
    assert len(batches) == 9
    for epoch in range(3):  # each epoch's batches cover its rows once
        assert sorted(sum(batches.batches(epoch), [])) == list(range(72))
    data.augmentation.close()
    again.augmentation.close()


def test_training_with_fresh_copies_runs_every_epoch_on_its_own_rows(tiny_dir, tmp_path):
    seen = []

    class Rows(fastcls.Callback):
        def on_step_end(self, state):
            seen.append(state.epoch)

    result = fastcls.train(config(tiny_dir, tmp_path, epochs=2), callbacks=[Rows()])
    assert result.steps == 18 and seen.count(0) == seen.count(1) == 9
    state = json.loads((result.output / "trainer_state.json").read_text())
    assert 0 <= state["augment_wait_seconds"] < result.train_seconds


def test_fresh_copies_are_never_served_from_the_prefix_cache(tiny_dir, tmp_path):
    common = dict(epochs=2, freeze_embeddings=True, freeze_layers=1)
    fresh = fastcls.train(config(tiny_dir, tmp_path / "fresh", **common))
    assert fresh.frozen["cache"].startswith("off: --augment-copies fresh")
    fixed = fastcls.train(config(tiny_dir, tmp_path / "fixed", augment_copies="fixed", **common))
    assert fixed.frozen["cache"] == "on" and fixed.frozen["cache_rows"] == 72


@pytest.mark.parametrize("flags, message", [
    (["--synonyms", "x.tsv"], "--synonyms is for --augment eda"),
    (["--augment", "eda", "--label-column", "label", "--label-column", "other"], "--augment: EDA augments single-task"),
    (["--augment", "eda", "--num-aug", "0"], "--num-aug"),
    (["--augment", "eda", "--alpha-sr", "1.5"], "--alpha-sr"),
    (["--augment", "eda", "--augment-copies", "sometimes"], "--augment-copies"),
])
def test_bad_augmentation_flags_are_one_line(tiny_dir, tmp_path, capsys, flags, message):
    try:  # flag values argparse checks raise SystemExit; the others return the exit code
        code = main(["train", "--model", str(tiny_dir / "encoder"), "--train", str(tiny_dir / "train.tsv"), "--output",
                     str(tmp_path / "run"), "--max-steps", "1", *flags])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_run_says_what_augmentation_it_used(tiny_dir, tmp_path, capsys):
    main(["train", "--model", str(tiny_dir / "encoder"), "--train", str(tiny_dir / "train.tsv"), "--output",
          str(tmp_path / "run"), "--max-steps", "2", "--augment", "eda", "--num-aug", "1", "--augment-copies", "fixed"])
    out = capsys.readouterr()
    said = out.out + out.err
    assert "48 training rows (24 and their EDA copies)" in said
    assert "EDA: 1 copy per row" in said and "WordNet" in said


def test_config_check_names_the_flag():
    with pytest.raises(ConfigError, match="--augment must be one of none, eda"):
        TrainConfig(augment="yes").resolve()
