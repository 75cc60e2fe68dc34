"""Per-class accuracy and the confusion matrix of an evaluation, as JSON-ready dicts (``peftx eval``, summary.json)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def class_report(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> dict[str, Any]:
    """From [true][predicted] counts: each class's n, accuracy (recall) and the class it is most often taken for,
    plus the matrix itself with its labels. A class with no images has accuracy None (not measured, not 0)."""
    names = [str(n) for n in class_names]
    rows = []
    for i, row in enumerate(confusion):
        n = int(sum(row))
        wrong = [(int(c), j) for j, c in enumerate(row) if j != i and c > 0]
        count, j = max(wrong) if wrong else (0, None)
        rows.append(
            {
                "class": names[i],
                "n": n,
                "correct": int(row[i]),
                "accuracy": row[i] / n if n else None,
                "most_confused_with": names[j] if j is not None else None,
                "confused_count": count,
            }
        )
    return {
        "per_class": rows,
        "confusion_matrix": {
            "labels": names,
            "rows": "true class",
            "columns": "predicted class",
            "counts": [[int(c) for c in row] for row in confusion],
        },
    }
