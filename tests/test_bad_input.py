"""Bad input through the command line: every case of the table runs through `fastcls.cli.main` and must end with
exit code 2, exactly one stderr line naming the flag, file or line at fault, no traceback, and the folders it
touched unchanged (a snapshot of names and bytes before and after)."""
import json
import shutil

import pytest
from tiny import make_tiny_encoder, sst2_rows, write_tsv

from fastcls.cli import main
from fastcls.config import TrainConfig
from fastcls.trainer import train


class World:
    """One tiny run folder and data files for the whole module; corrupted copies of the run folder by name."""


def _corrupt(run, folder, name, damage):
    shutil.copytree(run, folder)
    damage(folder / name)
    return folder


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _without_key(key):
    def damage(path):
        meta = json.loads(path.read_text())
        del meta[key]
        path.write_text(json.dumps(meta))
    return damage


CORRUPTIONS = {  # name: (file, damage, what the error line must name)
    "weights-truncated": ("model.safetensors", _truncate, "model.safetensors"),
    "weights-garbage": ("model.safetensors", lambda p: p.write_bytes(b"\x00garbage" * 64), "model.safetensors"),
    "weights-missing": ("model.safetensors", lambda p: p.unlink(), "model.safetensors"),
    "head-truncated": ("fastcls_head.safetensors", _truncate, "fastcls_head.safetensors"),
    "fastcls-json-empty": ("fastcls.json", lambda p: p.write_text(""), "fastcls.json"),
    "fastcls-json-incomplete": ("fastcls.json", _without_key("max_length"), "fastcls.json"),
    "fastcls-json-not-utf8": ("fastcls.json", lambda p: p.write_bytes(b'{"format": "\xff"}'), "fastcls.json"),
    "labels-garbage": ("labels.json", lambda p: p.write_text("{oops"), "labels.json"),
    "labels-not-a-map": ("labels.json", lambda p: p.write_text("[1, 2]"), "labels.json"),
    "config-garbage": ("config.json", lambda p: p.write_text("not json at all"), "config.json"),
    "config-no-model-type": ("config.json", lambda p: p.write_text("{}"), "config.json"),
    "config-bad-sizes": ("config.json", lambda p: p.write_text(p.read_text().replace('"num_attention_heads": 2',
                                                                                    '"num_attention_heads": 5')),
                         "config.json"),
    "tokenizer-garbage": ("tokenizer.json", lambda p: p.write_text("garbage"), "tokenizer.json"),
    "tokenizer-wrong-shape": ("tokenizer.json", lambda p: p.write_text('{"a": 1}'), "tokenizer.json"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World()
    w.tmp = tmp_path_factory.mktemp("bad_input")
    w.encoder = make_tiny_encoder(w.tmp / "encoder")
    w.train = write_tsv(w.tmp / "train.tsv", sst2_rows(16))
    w.run = train(TrainConfig(model=str(w.encoder), train=str(w.train), dev=str(w.train), output=str(w.tmp / "run"),
                              max_steps=2, batch_size=8, log_every=100)).output
    w.corrupt = {name: _corrupt(w.run, w.tmp / name, file, damage)
                 for name, (file, damage, _) in CORRUPTIONS.items()}
    w.a_file = w.tmp / "a_file.txt"
    w.a_file.write_text("notes\n")
    w.not_empty = w.tmp / "mine"
    w.not_empty.mkdir()
    (w.not_empty / "config.json").write_text('{"my": "settings"}')
    files = {
        "bad_fields.tsv": b"label\tsentence\n1\tfine\n0\ttoo\tmany\n",
        "empty_text.tsv": b"label\tsentence\n1\tfine\n0\t \n",
        "no_label.tsv": b"label\tsentence\n1\tfine\n\tno label here\n",
        "latin1.tsv": b"label\tsentence\n1\tfine\n0\tcaf\xe9 au lait\n",
        "latin1.csv": b"label,sentence\n1,fine\n0,\"ok\"\n1,na\xefve\n",
        "latin1.jsonl": b'{"label": 1, "text": "fine"}\n{"label": 0, "text": "caf\xe9"}\n',
        "bad.jsonl": b'{"label": 1, "text": "fine"}\n{"label": 0, "text": \n',
        "empty.tsv": b"",
        "unclosed.csv": b'label,sentence\n1,fine\n0,"never closed\n1,more\n',
        "garbled.json": b"{not json",
        "lr_string.json": b'{"lr": "fast"}',
        "overwrite_string.json": b'{"overwrite": "false"}',
    }
    for name, data in files.items():
        (w.tmp / name).write_bytes(data)
    return w


def _snapshot(folder):
    """Every file's bytes (a symlink as its target) under `folder`; None when it does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.readlink() if p.is_symlink() else p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _train(w, *extra):
    return ["train", "--model", str(w.encoder), "--train", str(w.train), "--output", str(w.tmp / "new_run"),
            "--max-steps", "1", *extra]


# (id, argv(world), what the one error line must contain)
CASES = [
    ("train-lr-inf", lambda w: _train(w, "--lr", "inf"), ["--lr"]),
    ("train-lr-nan", lambda w: _train(w, "--lr", "nan"), ["--lr"]),
    ("train-batch-size-0", lambda w: _train(w, "--batch-size", "0"), ["--batch-size"]),
    ("train-max-length-1", lambda w: _train(w, "--max-length", "1"), ["--max-length"]),
    ("train-bad-choice-in-config", lambda w: _train(w, "--config", str(w.tmp / "lr_string.json")), ["'lr'"]),
    ("train-string-bool-in-config", lambda w: _train(w, "--config", str(w.tmp / "overwrite_string.json")),
     ["'overwrite'"]),
    ("train-garbled-config", lambda w: _train(w, "--config", str(w.tmp / "garbled.json")), ["--config", "garbled.json"]),
    ("train-missing-config", lambda w: _train(w, "--config", str(w.tmp / "nope.json")), ["--config", "nope.json"]),
    ("train-missing-data", lambda w: _train(w, "--train", str(w.tmp / "nope.tsv")), ["nope.tsv"]),
    ("train-missing-dev", lambda w: _train(w, "--dev", str(w.tmp / "nope.tsv")), ["nope.tsv"]),
    ("train-empty-data", lambda w: _train(w, "--train", str(w.tmp / "empty.tsv")), ["empty.tsv"]),
    ("train-bad-fields", lambda w: _train(w, "--train", str(w.tmp / "bad_fields.tsv")), ["bad_fields.tsv:3"]),
    ("train-empty-text", lambda w: _train(w, "--train", str(w.tmp / "empty_text.tsv")), ["empty_text.tsv:3"]),
    ("train-no-label", lambda w: _train(w, "--train", str(w.tmp / "no_label.tsv")), ["no_label.tsv:3"]),
    ("train-unclosed-quote", lambda w: _train(w, "--train", str(w.tmp / "unclosed.csv")), ["unclosed.csv:3"]),
    ("train-bad-jsonl", lambda w: _train(w, "--train", str(w.tmp / "bad.jsonl")), ["bad.jsonl:2"]),
    ("train-missing-column", lambda w: _train(w, "--label-column", "stars"), ["'stars'", "train.tsv"]),
    ("train-missing-text-column", lambda w: _train(w, "--text-column", "body"), ["'body'", "train.tsv"]),
    ("train-latin1-tsv", lambda w: _train(w, "--train", str(w.tmp / "latin1.tsv")),
     ["latin1.tsv:3", "byte offset 27"]),
    ("train-latin1-csv", lambda w: _train(w, "--train", str(w.tmp / "latin1.csv")),
     ["latin1.csv:4", "byte offset 33"]),
    ("train-latin1-jsonl", lambda w: _train(w, "--train", str(w.tmp / "latin1.jsonl")),
     ["latin1.jsonl:2", "byte offset 54"]),
    ("train-model-missing", lambda w: _train(w, "--model", str(w.tmp / "nope")), ["--model", "nope"]),
    ("train-model-without-weights", lambda w: _train(w, "--model", str(w.tmp / "config-only")), ["config-only"]),
    ("train-output-is-a-file", lambda w: _train(w, "--output", str(w.a_file)), ["--output", "a_file.txt"]),
    ("train-output-under-a-file", lambda w: _train(w, "--output", str(w.a_file / "sub")), ["--output", "a_file.txt"]),
    # the output is checked before anything is loaded: a bad --output is named even with a missing model
    ("train-output-checked-first", lambda w: _train(w, "--output", str(w.a_file / "sub"), "--model", "nope"),
     ["--output"]),
    ("predict-output-checked-first", lambda w: ["predict", "--model", "nope", "--data", str(w.train), "--output",
                                                str(w.a_file / "p.csv")], ["--output"]),
    ("export-output-checked-first", lambda w: ["export", "--model", "nope", "--output", str(w.a_file / "hf")],
     ["--output"]),
    ("train-output-not-empty", lambda w: _train(w, "--output", str(w.not_empty)), ["--output", "not empty"]),
    ("train-output-holds-a-model", lambda w: _train(w, "--output", str(w.run)), ["--output", "already holds"]),
    ("eval-missing-model", lambda w: ["eval", "--model", str(w.tmp / "nope"), "--data", str(w.train)], ["--model"]),
    ("eval-encoder-not-a-run", lambda w: ["eval", "--model", str(w.encoder), "--data", str(w.train)],
     ["--model", "fastcls.json"]),
    ("eval-missing-data", lambda w: ["eval", "--model", str(w.run), "--data", str(w.tmp / "nope.tsv")], ["nope.tsv"]),
    ("eval-latin1", lambda w: ["eval", "--model", str(w.run), "--data", str(w.tmp / "latin1.tsv")],
     ["latin1.tsv:3", "byte offset 27"]),
    ("eval-bad-fields", lambda w: ["eval", "--model", str(w.run), "--data", str(w.tmp / "bad_fields.tsv")],
     ["bad_fields.tsv:3"]),
    ("eval-missing-column", lambda w: ["eval", "--model", str(w.run), "--data", str(w.train), "--label-column", "y"],
     ["'y'"]),
    ("eval-output-under-a-file", lambda w: ["eval", "--model", str(w.run), "--data", str(w.train), "--output",
                                            str(w.a_file / "report.json")], ["--output"]),
    ("predict-output-under-a-file", lambda w: ["predict", "--model", str(w.run), "--data", str(w.train), "--output",
                                               str(w.a_file / "p.csv")], ["--output", "a_file.txt"]),
    ("predict-output-is-a-folder", lambda w: ["predict", "--model", str(w.run), "--data", str(w.train), "--output",
                                              str(w.tmp)], ["--output"]),
    ("predict-latin1-jsonl", lambda w: ["predict", "--model", str(w.run), "--data", str(w.tmp / "latin1.jsonl"),
                                        "--output", str(w.tmp / "p.csv")], ["latin1.jsonl:2", "byte offset 54"]),
    ("export-missing-model", lambda w: ["export", "--model", str(w.tmp / "nope"), "--output", str(w.tmp / "hf")],
     ["--model"]),
    ("export-output-is-a-file", lambda w: ["export", "--model", str(w.run), "--output", str(w.a_file)],
     ["--output", "a_file.txt"]),
    ("export-output-not-empty", lambda w: ["export", "--model", str(w.run), "--output", str(w.not_empty)],
     ["--output", "not empty"]),
    ("export-output-under-a-file", lambda w: ["export", "--model", str(w.run), "--output", str(w.a_file / "hf")],
     ["--output", "a_file.txt"]),
]
# every corruption of a run folder through every command that reads one
for corruption, (_, _, named) in CORRUPTIONS.items():
    CASES += [
        (f"eval-{corruption}", lambda w, c=corruption: ["eval", "--model", str(w.corrupt[c]), "--data", str(w.train)],
         [named]),
        (f"predict-{corruption}", lambda w, c=corruption: ["predict", "--model", str(w.corrupt[c]), "--data",
                                                           str(w.train), "--output", str(w.tmp / "p.jsonl")], [named]),
        (f"export-{corruption}", lambda w, c=corruption: ["export", "--model", str(w.corrupt[c]), "--output",
                                                          str(w.tmp / "hf")], [named]),
        (f"train-from-{corruption}", lambda w, c=corruption: _train(w, "--model", str(w.corrupt[c])), [named]),
    ]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_gives_one_line_exit_2_and_touches_nothing(world, case, capsys):
    _, argv, named = case
    argv = argv(world)
    if "config-only" in " ".join(argv) and not (world.tmp / "config-only").exists():
        (world.tmp / "config-only").mkdir()
        shutil.copy(world.encoder / "config.json", world.tmp / "config-only")
    watched = [world.tmp / "new_run", world.tmp / "hf", world.tmp / "p.csv", world.tmp / "p.jsonl", world.a_file,
               world.not_empty, world.run, *world.corrupt.values()]
    before = [_snapshot(path) if path.is_dir() else path.exists() and path.read_bytes() for path in watched]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in named:
        assert needle in lines[0], (needle, lines[0])
    after = [_snapshot(path) if path.is_dir() else path.exists() and path.read_bytes() for path in watched]
    assert after == before
