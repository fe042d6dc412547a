"""Label strings <-> class ids, saved next to the model as labels.json so predictions decode the same way."""
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
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: label file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
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
