"""Label strings <-> class ids, saved next to the model as labels.json so predictions decode the same way: one
`LabelMap`, or for a multi-task run one per task (`TaskLabels`)."""
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from fastcls.data.errors import DataError


class LabelMap:
    """The class names in id order: ``names[i]`` is the label of class id ``i``.

    ``values`` are the labels as the data spells them (``"0"``, ``"1"``), when ``names`` renames them
    (``--label-names negative positive``); data may then use either spelling."""

    def __init__(self, names: Sequence[str], values: Sequence[str] | None = None):
        names = list(names)
        values = names if values is None else list(values)
        for what in (names, values):
            if not what:
                raise DataError("no labels: a label map needs at least one class")
            if any(not isinstance(name, str) or not name for name in what):
                raise DataError(f"labels must be non-empty strings, got {what!r}")
            if len(set(what)) != len(what):
                raise DataError(f"duplicate labels in {what!r}")
        if len(values) != len(names):
            raise DataError(f"{len(names)} label names for {len(values)} labels ({', '.join(values)})")
        self.names, self.values = names, values
        self._ids = {**{name: i for i, name in enumerate(names)}, **{value: i for i, value in enumerate(values)}}

    def renamed(self, names: Sequence[str] | None, flag: str = "--label-names") -> "LabelMap":
        """The same classes under display `names` (None keeps these)."""
        if names is None:
            return self
        if len(names) != len(self):
            raise DataError(f"{flag}: {len(names)} names given for the {len(self)} labels of the data "
                            f"({', '.join(self.values)}, in id order)")
        return LabelMap(names, self.values)

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> "LabelMap":
        """The distinct labels, ordered by value when all are integers (so "1".."4" become ids 0..3 and
        "2" comes before "10"), otherwise alphabetically; the order is thus the same for every file."""
        distinct = set(labels)
        if None in distinct:
            raise DataError("cannot build a label map from unlabelled examples")
        if all(_is_int(label) for label in distinct):
            # the string breaks ties between spellings of one number ("1", "01") so the order stays fixed
            return cls(sorted(distinct, key=lambda label: (int(label), label)))
        return cls(sorted(distinct))

    def encode(self, label: str, *, where: str = "") -> int:
        """The id of `label`; `where` (``file:line``) locates an unseen label in the error."""
        try:
            return self._ids[label]
        except KeyError:
            prefix = f"{where}: " if where else ""
            raise DataError(
                f"{prefix}label {label!r} is not one of the {len(self)} known labels: {', '.join(self.names)}"
            ) from None

    def decode(self, class_id: int) -> str:
        if not 0 <= class_id < len(self.names):
            raise ValueError(f"class id {class_id} out of range for {len(self.names)} labels")
        return self.names[class_id]

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, label: object) -> bool:
        return label in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.names == other.names and self.values == other.values

    def __repr__(self) -> str:
        return f"LabelMap({self.names!r})"

    def to_dict(self) -> dict[str, list[str]]:
        out = {"id2label": list(self.names)}
        if self.values != self.names:
            out["values"] = list(self.values)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LabelMap":
        if not isinstance(data, dict) or not isinstance(data.get("id2label"), list):
            raise DataError(f"a label map needs an 'id2label' list, got {data!r}")
        return cls(data["id2label"], data.get("values"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "LabelMap":
        return _load(cls, path)


class TaskLabels:
    """The label maps of a multi-task run, in task order: task `t` owns logits `offsets[t]:offsets[t + 1]` of the
    heads' concatenated output."""

    def __init__(self, names: Sequence[str], maps: Sequence[LabelMap]):
        self.names, self.maps = list(names), list(maps)
        if len(self.names) != len(self.maps) or not self.names:
            raise DataError(f"{len(self.names)} task names for {len(self.maps)} label maps")
        if len(set(self.names)) != len(self.names):
            raise DataError(f"duplicate task names in {self.names!r}")
        self.offsets = [0]
        for label_map in self.maps:
            self.offsets.append(self.offsets[-1] + len(label_map))

    @property
    def num_labels(self) -> list[int]:
        return [len(m) for m in self.maps]

    def task_logits(self, logits, task: int):
        """Task `task`'s columns of the heads' concatenated logits [rows, sum K_t]."""
        return logits[:, self.offsets[task]:self.offsets[task + 1]]

    def index(self, task: str, flag: str = "--task") -> int:
        if task not in self.names:
            raise DataError(f"{flag} {task}: the run's tasks are {', '.join(self.names)}")
        return self.names.index(task)

    def __getitem__(self, task: str) -> LabelMap:
        return self.maps[self.index(task)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskLabels) and self.names == other.names and self.maps == other.maps

    def __repr__(self) -> str:
        return "TaskLabels(" + ", ".join(f"{n}={m.names!r}" for n, m in zip(self.names, self.maps, strict=True)) + ")"

    def to_dict(self) -> dict:
        return {"tasks": [{"name": name, **m.to_dict()} for name, m in zip(self.names, self.maps, strict=True)]}

    @classmethod
    def from_dict(cls, data: dict) -> "TaskLabels":
        tasks = data.get("tasks") if isinstance(data, dict) else None
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tasks):
            raise DataError(f"a multi-task label map needs a 'tasks' list of named label maps, got {data!r}")
        return cls([t["name"] for t in tasks], [LabelMap.from_dict(t) for t in tasks])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "TaskLabels":
        return _load(cls, path)


def load_labels(path: str | Path) -> "LabelMap | TaskLabels":
    """labels.json of a run: one label map, or a multi-task run's (a 'tasks' list)."""
    return _load(None, path)


def _load(cls, path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if cls is None:
        cls = TaskLabels if isinstance(data, dict) and "tasks" in data else LabelMap
    try:
        return cls.from_dict(data)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def _is_int(label: str) -> bool:
    try:
        int(label)
    except ValueError:
        return False
    return True
