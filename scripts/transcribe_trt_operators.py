#!/usr/bin/env python3
"""Transcribe one release's onnx-tensorrt ``docs/operators.md`` into the JSON op list a target profile reads.

Usage (from a clone of github.com/onnx/onnx-tensorrt)::

    git show 8.6-GA:docs/operators.md > /tmp/ops.md
    python scripts/transcribe_trt_operators.py /tmp/ops.md --ref 8.6-GA --commit "$(git rev-parse 8.6-GA)" \
        --out exports/data/onnx_tensorrt_ops_8.6-GA.json

Names, the Y/N column, the supported-types column and the restrictions are copied as written (restrictions lose
only their table padding); the header's TensorRT version, opset range, data types and notes are parsed from its
first lines. Nothing is added that the file does not say: where a target needs a list no branch provides, its
profile says so (exports/targets.py) instead of inventing one. Where the file contradicts the parser's own source at
the same commit (a typo, a types column narrower than the importer), ``--erratum`` records the correction beside the
transcription, with the evidence; the transcribed row itself is never edited (targets.py applies errata on load).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO_URL = "https://github.com/onnx/onnx-tensorrt"
_RANGE = re.compile(
    r"TensorRT\s+([0-9.]+)\s+supports operators in the inclusive range of opset\s+(\d+)"
    r"\s+to opset\s+(\d+)"
)
_UP_TO = re.compile(r"TensorRT\s+([0-9.]+)\s+supports operators up to Opset\s+(\d+)", re.IGNORECASE)
_TYPES = re.compile(r"TensorRT supports the following ONNX data types:\s*(.+)")
_TYPE_NAMES = {"FLOAT32": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16"}


def parse(text: str) -> dict:
    header = {}
    if match := _RANGE.search(text):
        header = {"tensorrt_version": match[1], "opset_min": int(match[2]), "opset_max": int(match[3])}
    elif match := _UP_TO.search(text):
        # 8.x docs give only a ceiling; the parser's floor for these releases is opset 7 (its ModelImporter check),
        # which no peftx export comes near, so 9 (the 10.x floor) is recorded as the conservative bound.
        header = {
            "tensorrt_version": match[1],
            "opset_min": 9,
            "opset_max": int(match[2]),
            "opset_min_note": "the 8.x docs state only the ceiling; 9 is a conservative floor",
        }
    if not header:
        raise SystemExit("no 'TensorRT X supports operators ...' line found")
    types_line = _TYPES.search(text)
    data_types = (
        [_TYPE_NAMES.get(t, t) for t in re.split(r",\s*(?:and\s+)?|\s+and\s+", types_line[1].rstrip(". ")) if t]
        if types_line
        else []
    )
    notes = [
        line.lstrip("> ").replace("Note: ", "").strip() for line in text.splitlines() if line.startswith("> Note:")
    ]
    return {**header, "data_types": data_types, "header_notes": notes, "operators": _operators(text)}


def _operators(text: str) -> dict:
    table = text.split("## Operator Support Matrix", 1)[-1]
    operators = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0] or cells[0] == "Operator" or set(cells[0]) <= {"-"}:
            continue
        name, support = cells[0], cells[1]
        types = [t.strip() for t in cells[2].split(",") if t.strip()] if len(cells) > 2 else []
        supported = support.upper().startswith("Y")
        entry: dict = {"supported": supported, "types": types if supported else []}
        if supported and types and not all(re.fullmatch(r"[A-Z0-9]+", t) for t in types):
            raise SystemExit(f"{name}: unexpected types column {cells[2]!r}")
        if not supported and len(cells) > 2 and cells[2]:
            entry["restrictions"] = cells[2]  # an N row's text (e.g. DynamicQuantizeLinear's) is a remark
        restriction = " ".join(c for c in cells[3:] if c)
        if restriction:
            entry["restrictions"] = restriction
        if "EXPERIMENTAL" in support.upper():
            entry["experimental"] = True
        operators[name] = entry
    if not operators:
        raise SystemExit("no operator rows found")
    return dict(sorted(operators.items()))


def dump(record: dict) -> str:
    """JSON with one line per operator, so a diff between two releases' lists reads op by op."""
    head = {k: v for k, v in record.items() if k not in ("operators", "errata")}
    ops = ",\n".join(
        f"  {json.dumps(name)}: {json.dumps(entry, ensure_ascii=False)}" for name, entry in record["operators"].items()
    )
    errata = json.dumps(record.get("errata", {}), indent=1, ensure_ascii=False).replace("\n", "\n ")
    return (
        json.dumps(head, indent=1, ensure_ascii=False)[:-2]
        + ',\n "operators": {\n'
        + ops
        + "\n },\n"
        + f' "errata": {errata}\n}}\n'
    )


def _errata(items: list[str], operators: dict) -> dict:
    errata = {}
    for item in items:
        head, _, reason = item.partition("|")
        op, _, types = head.partition("=")
        if op not in operators or not reason.strip():
            raise SystemExit(f"erratum {item!r}: unknown op or no evidence")
        errata[op] = {"types": [t.strip() for t in types.split(",") if t.strip()], "evidence": reason.strip()}
    return errata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("markdown", type=Path)
    parser.add_argument("--ref", required=True, help="branch or tag the file was read from, e.g. 8.6-GA")
    parser.add_argument("--commit", default=None, help="the commit it was read at (None when unknown)")
    parser.add_argument("--remark", action="append", default=[], help="a note on how this list is used")
    parser.add_argument(
        "--erratum",
        action="append",
        default=[],
        help="'OP=TYPE,TYPE|evidence': the supported types the importer source shows",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = parse(args.markdown.read_text(encoding="utf-8"))
    source = f"{REPO_URL}/blob/{args.commit or args.ref}/docs/operators.md"
    record = {
        "_comment": "Transcribed by scripts/transcribe_trt_operators.py from the source below; do not edit by "
        "hand, re-run the script.",
        "source": source,
        "repository": REPO_URL,
        "ref": args.ref,
        "commit": args.commit,
        "remarks": args.remark,
        **data,
        "errata": _errata(args.erratum, data["operators"]),
    }
    args.out.write_text(dump(record), encoding="utf-8")
    print(
        f"{args.out}: TensorRT {data['tensorrt_version']}, opset {data['opset_min']}..{data['opset_max']}, "
        f"{len(data['operators'])} operators ({sum(e['supported'] for e in data['operators'].values())} supported)"
    )


if __name__ == "__main__":
    main()
