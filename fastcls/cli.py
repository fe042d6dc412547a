"""`fastcls train | eval | predict | export | augment | info | plot`.

Long because the train command's flags (one per TrainConfig field, with its help) are listed here, where argparse
reads them; each command's handler is a few lines that call into the library.
"""
import argparse
import json
import os
import sys

# fastcls never reaches for a model hub: every model is a local folder
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

S = argparse.SUPPRESS


def _add_data_args(p: argparse.ArgumentParser, train: bool = False) -> None:
    p.add_argument("--text-column", dest="text_columns", action="append", default=S,
                   help="text column (repeat to join several columns into one text); inferred when omitted")
    p.add_argument("--text-pair-column", default=S, help="second text of a pair (e.g. hypothesis)")
    if train:
        p.add_argument("--label-column", action="append", default=S,
                       help="label column (default: label); repeat for one task per column (multi-task: a row may "
                            "leave a task's cell empty)")
    else:
        p.add_argument("--label-column", default=S,
                       help="label column (default: label; a multi-task run's: each task's own column)")


def _add_skip_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="drop malformed rows and rows without text or label, and say which, instead of stopping")


def _eda_ops(value: str) -> list[str]:
    return [op.strip() for op in value.split(",") if op.strip()]  # the names are checked by EdaConfig.check


def _add_eda_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    """EDA's flags (`fastcls augment`, `fastcls train --augment eda`); without `defaults` an absent flag sets
    nothing (a parser with argument_default=SUPPRESS)."""
    from fastcls.augment.config import EdaConfig

    def default(name: str) -> dict:
        value = getattr(EdaConfig, name)
        return {"default": list(value) if isinstance(value, tuple) else value} if defaults else {}

    p.add_argument("--num-aug", type=int, metavar="K", **default("num_aug"),
                   help="augmented copies per row, besides the original (default 4)")
    for op, name in (("sr", "synonym replacement"), ("ri", "random insertion"), ("rs", "random swap")):
        p.add_argument(f"--alpha-{op}", type=float, metavar="A", **default(f"alpha_{op}"),
                       help=f"{name}: max(1, int(A * words)) edits per copy (default 0.1)")
    p.add_argument("--p-rd", type=float, metavar="P", **default("p_rd"),
                   help="random deletion: each word deleted with probability P (default 0.1)")
    p.add_argument("--eda-ops", type=_eda_ops, metavar="OPS", **default("ops"),
                   help="the operations copies are drawn from, comma-separated (default sr,ri,rs,rd)")
    p.add_argument("--synonyms", metavar="FILE", **({"default": None} if defaults else {}),
                   help="word<TAB>synonym<TAB>... table instead of the bundled English WordNet 3.0 one")


def _choices(name: str) -> dict:
    from fastcls.config import CHOICES

    return {"choices": CHOICES[name]}


def _on_off(value: str):
    """on | off as a bool; any other value goes on as given, for TrainConfig to refuse in one line (argparse's
    refusal prints the whole usage)."""
    return {"on": True, "off": False}.get(value, value)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune an encoder (defaults: bundled MiniLM on bundled SST-2 rows)",
                       argument_default=S)
    p.add_argument("--config", help="JSON, TOML or YAML file of settings; flags override it")
    p.add_argument("--model", help="Hugging Face encoder folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--train", help="training file: .tsv, .csv or .jsonl with a header/keys")
    p.add_argument("--dev", help="dev file, evaluated during training")
    p.add_argument("--output", help="output folder (default: fastcls_runs/<date-time>)")
    _add_data_args(p, train=True)
    p.add_argument("--label-names", nargs="+", metavar="NAME",
                   help="display names of the labels in id order (labels sort as integers, else alphabetically)")
    p.add_argument("--max-length", type=int, help="tokens per row, special tokens included (default 256)")
    p.add_argument("--batch-size", type=int, help="rows per optimizer micro-batch (default 32)")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--epochs", type=float, help="default 3; fractions allowed")
    p.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-5)")
    p.add_argument("--warmup", type=float, help="warmup: ratio of steps if < 1, else steps (default 0.06)")
    p.add_argument("--decay", **_choices("decay"))
    p.add_argument("--weight-decay", type=float, help="decoupled, not on biases and norm weights (default 0.01)")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping norm; 0 = off (default 1.0)")
    # the small-data recipes of Zhang et al. 2021 ("Revisiting few-sample BERT fine-tuning")
    p.add_argument("--layer-lr-decay", type=float, metavar="XI",
                   help="layer-wise lr decay: the top encoder layer at lr x XI, each layer below another x XI, the "
                        "embeddings lowest, the head at lr (default 1: off)")
    p.add_argument("--reinit-layers", type=int, metavar="N",
                   help="re-draw the top N encoder layers from the encoder's initialiser before training")
    p.add_argument("--bias-correction", type=_on_off, metavar="on|off",
                   help="Adam's bias correction (default on; off: BERT's original Adam, for comparison only: "
                        "unstable, above all on small data)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: each epoch)")
    p.add_argument("--metric", **_choices("metric"), help="picks the best checkpoint")
    p.add_argument("--patience", type=int, help="early stopping: evaluations without gain")
    p.add_argument("--dropout", type=float, help="head dropout (default: the encoder's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", **_choices("precision"))
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--head-impl", **_choices("head_impl"), help="fastcls kernels or PyTorch reference")
    p.add_argument("--pooling", **_choices("pooling"),
                   help="what the head reads: the [CLS] vector (default), or the mean of each row's tokens, as "
                        "sentence-transformers encoders (the bundled MiniLM) were trained")
    p.add_argument("--no-kernels", "--no-patch", dest="kernels", action="store_false",
                   help="run the encoder's dropout and LayerNorms on PyTorch's ops instead of fastcls's kernels")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each trainable layer's activations in the backward: less memory, more time")
    p.add_argument("--freeze-embeddings", action="store_true", help="do not train the embeddings")
    p.add_argument("--freeze-layers", type=int, metavar="N", help="do not train the bottom N encoder layers")
    p.add_argument("--no-cache-frozen", dest="cache_frozen", action="store_false",
                   help="recompute the frozen prefix every epoch instead of reusing its output per row")
    p.add_argument("--cache-budget-gb", type=float,
                   help="memory for the frozen-prefix cache (default 4); rows beyond it spill to disk")
    p.add_argument("--unpad", **_choices("unpad"),
                   help="run the encoder on unpadded, concatenated tokens (auto: on the CPU, and on CUDA where the "
                        "frozen-prefix cache needs it)")
    p.add_argument("--cuda-graphs", **_choices("cuda_graphs"),
                   help="replay each step from CUDA graphs, batches padded to a few fixed shapes (auto: off)")
    p.add_argument("--log-every", type=int, help="steps between train records in metrics.jsonl and console lines "
                                                 "(default 10)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or step lines: only warnings, errors and the result")
    p.add_argument("--report-to", action="append", metavar="NAME",
                   help="loggers, as the HF Trainer's: tensorboard, all (each one installed) or none (default)")
    p.add_argument("--logging-dir", metavar="DIR", help="TensorBoard's folder (default OUTPUT/runs/<date-time>_<host>)")
    p.add_argument("--plot", action="store_true", help="draw OUTPUT/metrics.png at the end (`fastcls plot`)")
    p.add_argument("--group-size", type=int, help="batches per length-sorted group (default 50)")
    p.add_argument("--overwrite", action="store_true", help="train into a folder that already holds a model")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 (one unit per encoder layer) instead of DDP")
    _add_skip_arg(p)
    p.add_argument("--save-every", type=int, metavar="N",
                   help="write a resumable checkpoint every N optimizer steps into OUTPUT/checkpoints/")
    p.add_argument("--save-total-limit", type=int, metavar="K", help="keep the newest K resumable checkpoints")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its newest resumable checkpoint, with its settings ('latest': the run "
                        "in --output, else the newest under fastcls_runs/)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction,
                   help="deterministic kernels and reductions (default: on for the CPU, off on CUDA)")
    g = p.add_argument_group("multi-task", "one encoder, one head per task (tasks from several --label-column of "
                                           "--train, or from files with --task)")
    g.add_argument("--task", dest="tasks", action="append", metavar="NAME=TRAIN[,DEV][:LABEL_COLUMN]",
                   help="a task from its own file(s) (repeat per task; label column default: label)")
    g.add_argument("--task-weight", dest="task_weights", action="append", metavar="NAME=ALPHA",
                   help="the task's loss weight (default 1 / number of tasks; for two tasks one weight alpha gives "
                        "the other 1 - alpha)")
    g.add_argument("--task-weighting", **_choices("task_weighting"),
                   help="fixed weights, or uncertainty: a learned log-variance per task (Kendall et al. 2018)")
    g.add_argument("--task-sampling", **_choices("task_sampling"),
                   help="rows per epoch of each task file: proportional to its size (default), uniform, or "
                        "temperature: p proportional to n ** (1 / T)")
    g.add_argument("--sampling-temperature", type=float, metavar="T", help="for --task-sampling temperature "
                                                                           "(default 2)")
    g.add_argument("--task-layers", type=int, metavar="K", help="each task gets its own copy of the top K encoder "
                                                                "layers (default 0: all shared)")
    g.add_argument("--metric-task", metavar="NAME",
                   help="choose the best checkpoint (and stop early) on this task's --metric, not the tasks' mean")
    g = p.add_argument_group("augmentation", "EDA copies of the training rows (synonym replacement, random "
                                             "insertion, swap and deletion; single-task runs)")
    g.add_argument("--augment", **_choices("augment"), help="eda: train on each row and --num-aug edited copies "
                                                            "(default none)")
    g.add_argument("--augment-copies", **_choices("augment_copies"),
                   help="fresh: new copies every epoch, drawn in the background (default); fixed: drawn once")
    _add_eda_args(g, defaults=False)


def _infer_parsers(sub) -> None:
    for name, help_ in (("eval", "accuracy, macro-F1 and per-class figures on a labelled file"),
                        ("predict", "label and probabilities per row")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", required=True, help="folder written by `fastcls train`")
        p.add_argument("--data", required=True, help=".tsv, .csv or .jsonl file")
        p.add_argument("--output", required=name == "predict", default=None,
                       help="predictions (.csv, .tsv or .jsonl)" if name == "predict" else "write the report as JSON")
        _add_data_args(p)
        p.add_argument("--task", metavar="NAME", default=None,
                       help="a multi-task run: only this task" + ("" if name == "predict" else
                                                                   " (default: every task, each on its label column)"))
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--device", default="auto")
        p.add_argument("--precision", default="auto", **_choices("precision"))
        if name == "eval":  # not predict: its output rows stand for the input rows one for one
            _add_skip_arg(p)


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line, as fastcls's own (the usage stays with --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from fastcls import __version__
    from fastcls.cli_help import EXAMPLES

    parser = _Parser(prog="fastcls", description=__doc__, epilog=EXAMPLES["fastcls"],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastcls {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _infer_parsers(sub)
    p = sub.add_parser("export", help="write a folder that AutoModelForSequenceClassification loads")
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--task", metavar="NAME", help="a multi-task run: the task to export")
    p.add_argument("--overwrite", action="store_true", help="export into a folder that is not empty")
    p = sub.add_parser("augment", help="write an augmented copy of a data file (EDA: each row and its copies)")
    p.add_argument("--input", required=True, help=".tsv, .csv or .jsonl file")
    p.add_argument("--output", required=True, help="the augmented file (.tsv, .csv or .jsonl)")
    _add_data_args(p)
    _add_eda_args(p, defaults=True)
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same copies (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    sub.add_parser("info", help="versions, device and the backend of every op")
    p = sub.add_parser("plot", help="draw a run's loss, learning rate, dev metrics and throughput as one PNG")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--output", help="the PNG (default RUN_DIR/metrics.png)")
    for name, p in sub.choices.items():  # the epilogs keep their lines: RawDescriptionHelpFormatter
        p.epilog, p.formatter_class = EXAMPLES.get(name), argparse.RawDescriptionHelpFormatter
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from fastcls.components.host_memory import keep_freed_host_memory
    from fastcls.components.precision import resolve_device
    from fastcls.components.resume import find_run, resumed_config
    from fastcls.config import TrainConfig, load_config_file
    from fastcls.trainer import train

    settings = load_config_file(args.config) if "config" in args else {}
    settings.update({k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "quiet")})
    run = find_run(args.resume, settings.get("output")) if "resume" in args else None
    cfg = resumed_config(run, settings) if run is not None else TrainConfig(**settings)
    if resolve_device(cfg.device).type == "cpu":
        keep_freed_host_memory()  # a process-wide allocator setting: the command's choice, not the library's
    result = train(cfg, resume=run is not None)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun rank 0 reports for all
    print(f"trained {result.steps} steps in {result.train_seconds:.1f} s "
          f"({result.train_samples_per_s:.1f} samples/s); model in {result.output}")
    if result.best is not None:
        mean = "mean over tasks: " if any(key.endswith("/accuracy") for key in result.best) else ""
        print(f"best dev: step {result.best['step']}, {mean}accuracy {result.best['accuracy']:.4f}, "
              f"macro-F1 {result.best['macro_f1']:.4f}")


def _load_for_inference(args: argparse.Namespace, require_labels: bool):
    import numpy as np

    from fastcls.components.checkpoint import load_run
    from fastcls.components.output_path import check_writable
    from fastcls.components.precision import resolve_device, resolve_precision
    from fastcls.data import (
        SkippedRows,
        read_examples,
        read_multitask_examples,
        task_labels,
        tokenize_examples,
    )
    from fastcls.data.collate import IGNORED_LABEL

    if args.output is not None:
        check_writable(args.output, folder=False)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model, tokenizer, labels, meta = load_run(args.model, device)
    skipped = SkippedRows() if getattr(args, "skip_bad_rows", False) else None
    texts = dict(text_columns=getattr(args, "text_columns", None) or meta.get("text_columns"),
                 text_pair_column=getattr(args, "text_pair_column", None) or meta.get("text_pair_column"),
                 skipped=skipped)
    tasks = _tasks_to_evaluate(args, labels, meta) if require_labels else None
    if tasks is None:  # single-task, or predictions
        label_column = getattr(args, "label_column", "label") if require_labels else None
        rows = read_examples(args.data, label_column=label_column, require_labels=require_labels, **texts)
    else:  # a multi-task run: the tasks' labels from their columns, in one pass
        rows = read_multitask_examples(args.data, label_columns=[column for _, column in tasks], **texts)
    if skipped is not None and skipped.lines:
        print(skipped.summary())
    single = require_labels and tasks is None
    encoded = tokenize_examples(rows, tokenizer, meta["max_length"], label_map=labels if single else None)
    if tasks is not None:
        chosen = [t for t, _ in tasks]
        matrix = np.full((len(rows), len(labels.names)), IGNORED_LABEL, dtype=np.int64)
        matrix[:, chosen] = task_labels(rows, [labels.maps[t] for t in chosen], [labels.names[t] for t in chosen])
        encoded.labels = matrix
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return model, labels, encoded, device, precision, pad_id


def _tasks_to_evaluate(args: argparse.Namespace, labels, meta: dict) -> list[tuple[int, str]] | None:
    """For a multi-task run: (task index, its label column) of the tasks to evaluate; None for a single task."""
    from fastcls.data import TaskLabels
    from fastcls.errors import ConfigError

    task = getattr(args, "task", None)
    if not isinstance(labels, TaskLabels):
        return None
    columns = meta.get("label_columns") or labels.names
    chosen = [labels.index(task)] if task is not None else range(len(labels.names))
    tasks = [(t, getattr(args, "label_column", None) or columns[t]) for t in chosen]
    shared = sorted({c for _, c in tasks if [c2 for _, c2 in tasks].count(c) > 1})
    if shared:
        raise ConfigError(f"--task: the tasks share the label column {shared[0]!r}; name the task this file is for "
                          f"with --task ({', '.join(labels.names)})")
    return tasks


def _one_task(args: argparse.Namespace, labels):
    """--task: that task's index in a multi-task run (an error for a single-task run), else None."""
    from fastcls.data import TaskLabels
    from fastcls.errors import ConfigError

    if args.task is None:
        return None
    if not isinstance(labels, TaskLabels):
        raise ConfigError(f"--task {args.task}: {args.model} is a single-task run")
    return labels.index(args.task)


def cmd_eval(args: argparse.Namespace) -> None:
    from fastcls.components.metrics import format_report
    from fastcls.evaluate import evaluate_logits, predict_logits

    model, labels, encoded, device, precision, pad_id = _load_for_inference(args, require_labels=True)
    _one_task(args, labels)
    logits = predict_logits(model, encoded, args.batch_size, device, precision, pad_id)
    report = evaluate_logits(logits, encoded, labels)
    if args.task is not None:  # one task's report, as a single-task run's
        per_class = report["per_class"][args.task]
        report = {key.split("/", 1)[1]: value for key, value in report.items() if key.startswith(f"{args.task}/")}
        report["per_class"] = per_class
    print(format_report(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)


def cmd_predict(args: argparse.Namespace) -> None:
    from fastcls.evaluate import predict_logits, write_predictions

    model, labels, encoded, device, precision, pad_id = _load_for_inference(args, require_labels=False)
    task = _one_task(args, labels)
    logits = predict_logits(model, encoded, args.batch_size, device, precision, pad_id)
    if task is not None:  # one task's predictions, as a single-task run's
        logits, labels = labels.task_logits(logits, task), labels.maps[task]
    write_predictions(args.output, logits, labels)
    print(f"wrote {len(encoded)} predictions to {args.output}")


def cmd_export(args: argparse.Namespace) -> None:
    from fastcls.export import export_hf

    print(f"exported to {export_hf(args.model, args.output, overwrite=args.overwrite, task=args.task)}")


def cmd_augment(args: argparse.Namespace) -> None:
    from fastcls.augment.command import run

    print(run(args))


def cmd_info(args: argparse.Namespace) -> None:
    from fastcls.info import describe

    print(describe())


def cmd_plot(args: argparse.Namespace) -> None:
    from fastcls.plot import command

    print(command(args))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export,
            "augment": cmd_augment, "info": cmd_info, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastcls.console import command_console
    from fastcls.errors import TrainingInterrupted, UserError

    try:
        with command_console(quiet=getattr(args, "quiet", False)):
            COMMANDS[args.command](args)
    except UserError as err:
        if os.environ.get("FASTCLS_DEBUG") == "1":
            raise
        print(f"fastcls {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:  # SIGINT/SIGTERM in training: a checkpoint was written first
        print(f"fastcls {args.command}: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: nothing to save
        print(f"fastcls {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
