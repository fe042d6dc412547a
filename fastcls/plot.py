"""`fastcls plot RUN_DIR` and `fastcls train --plot`: one PNG of a run's metrics.jsonl over the optimizer steps:
training loss (with the dev loss), learning rate, dev metrics (accuracy, macro-F1; per task in multi-task runs)
and throughput (samples/s). matplotlib (the `plot` extra) draws it off-screen (the Agg backend)."""
import json
from pathlib import Path

from fastcls.components.checkpoint import METRICS_FILE, PLOT_FILE
from fastcls.components.metrics import report_tasks
from fastcls.components.output_path import atomic_write, check_writable
from fastcls.errors import ConfigError, DataError


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (or of a run folder's), in order; a DataError naming the file and line
    of one that is not a JSON object with a step. Records written before records had a "kind" are evaluations."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} is not a folder")
    if path.is_dir():
        if not (path / METRICS_FILE).is_file():
            raise DataError(f"{path} has no {METRICS_FILE} (not a fastcls run folder?)")
        path = path / METRICS_FILE
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number} is not valid JSON: {err.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise DataError(f"{path} line {number} is not a metrics record (a JSON object with an integer step)")
            record.setdefault("kind", "eval")
            records.append(record)
    return records


def require_matplotlib(what: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs matplotlib: pip install \"fastcls[plot]\"") from None


def _line(ax, records: list[dict], key: str, label: str, **style) -> None:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if points:
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=label, **style)


def draw_metrics(records: list[dict], title: str | None = None):
    """A matplotlib Figure of four panels (loss, learning rate, dev metrics, throughput) over the steps. Runs
    without train records (older fastcls) show the evaluations' train loss and samples/s instead."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global figure state

    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    loss_key, speed_key = "loss", "samples_per_s"
    if not train:
        train, loss_key = evals, "train_loss"
    fig = Figure(figsize=(12, 8), layout="constrained")
    (loss, lr), (dev, speed) = fig.subplots(2, 2, sharex=True)
    _line(loss, train, loss_key, "train")
    _line(loss, evals, "dev_loss", "dev")
    _line(lr, train, "lr", "learning rate")
    tasks = report_tasks(evals[0]) if evals else []
    groups = [("", "mean " if tasks else ""), *((f"{task}/", f"{task} ") for task in tasks)]
    for i, (prefix, name) in enumerate(groups):  # a colour per task, macro-F1 dashed
        _line(dev, evals, f"{prefix}accuracy", f"{name}accuracy", color=f"C{i}")
        _line(dev, evals, f"{prefix}macro_f1", f"{name}macro-F1", color=f"C{i}", linestyle="--")
    _line(speed, train, speed_key, "samples/s")
    for ax, name in ((loss, "loss"), (lr, "learning rate"), (dev, "dev metrics"), (speed, "throughput (samples/s)")):
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no evaluations (no dev set)" if ax is dev else "no train records", ha="center",
                    va="center", transform=ax.transAxes)
    for ax in (dev, speed):
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    return fig


def write_plot(run: str | Path, output: str | Path | None = None) -> tuple[Path, list[dict]]:
    """Draw the run folder's metrics.jsonl into `output` (default RUN/metrics.png), written whole or not at all;
    returns the PNG's path and the records."""
    require_matplotlib("fastcls plot")
    run = Path(run)
    records = read_metrics(run)
    output = check_writable(output, "--output", folder=False) if output is not None else run / PLOT_FILE
    figure = draw_metrics(records, title=str(run))
    atomic_write(output, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return output, records


def command(args) -> str:
    """`fastcls plot`: what it wrote, in a line."""
    output, records = write_plot(args.run_dir, args.output)
    empty = "" if any(r["kind"] == "eval" for r in records) else " (no evaluations: the dev metrics panel is empty)"
    return f"wrote {output}{empty}"
