"""A stand-in for trtexec that parses its command line as one TensorRT release's trtexec does.

TensorRT cannot exist on the machines the tests run on, so build_engine.sh is run against this instead. It knows
nothing of peftx: what it accepts is read from ``tests/data/trtexec/trtexec_options_<release>.json``, transcribed by
``scripts/transcribe_trtexec_options.py`` from that release's ``samples/common/sampleOptions.cpp`` (and trtexec.cpp,
logging.h, the version headers) on NVIDIA/TensorRT's release branch. Like the real one it

* prints the banner first, on stdout: ``&&&& RUNNING TensorRT.trtexec [TensorRT v8503] # trtexec ...`` (8.x:
  major*1000+minor*100+patch; 10.x: major*10000+...; `` [bN]`` after it where the release's logging.h adds it);
* splits each word at its first '=' into name and value (a word without '=' is a name with an empty value, so
  ``--saveEngine model.engine`` leaves ``model.engine`` over as an unknown option); ``--help``/``-h`` print the help
  and exit 0;
* reads each option the release reads (a flag ignores its value; an int/float value must start with a number, as
  std::stoi/stof require; shapes, layer precisions and --precisionConstraints are checked as that release checks
  them), takes a non-repeated option once, and reports every word left over as ``[E] Unknown option: NAME VALUE``
  on stderr, then exits 1 (8.x/10.x also print ``&&&& FAILED ...``; 11.x returns without it);
* otherwise "builds": the ONNX file named must exist, the engine file is written where --saveEngine points, the
  device report lines (``Selected Device``, ``Compute Capability``) are printed, and ``&&&& PASSED`` ends it.

What it does not do: build anything, or check values the transcription marks only as "value" (IO formats, tactic
sources, ...), or reproduce every later consistency check of AllOptions::parse (it does the model-missing and the
8.x --batch-with-ONNX ones). Select the release with ``TRTEXEC_STAND_IN_RELEASE`` (``install`` writes a wrapper that
sets it); ``TRTEXEC_STAND_IN_VERSION`` (e.g. 8.5.2.2, JetPack 5's) changes the version the banner reports, not the
parser; ``TRTEXEC_STAND_IN_LOG`` names a JSON file where the parsed command line is written; ``TRTEXEC_STAND_IN_GPU``,
``TRTEXEC_STAND_IN_CC`` change the device report; ``TRTEXEC_STAND_IN_FAIL=1`` makes the build itself fail.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "trtexec"
RELEASES = ("8.5", "8.6", "10.3", "10.13", "11.1")


def load(release: str) -> dict:
    return json.loads((DATA / f"trtexec_options_{release}.json").read_text(encoding="utf-8"))


def install(bin_dir: Path, release: str, name: str = "trtexec") -> Path:
    """Write an executable ``bin_dir/name`` that runs this stand-in as ``release``'s trtexec."""
    if release not in RELEASES:
        raise ValueError(f"no transcription for TensorRT {release}")
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(
        "#!/bin/sh\n"
        f'TRTEXEC_STAND_IN_RELEASE="${{TRTEXEC_STAND_IN_RELEASE:-{release}}}" '
        f'exec "{sys.executable}" -S "{Path(__file__).resolve()}" "$0" "$@"\n'
    )
    path.chmod(0o755)
    return path


class _ParseError(Exception):
    """std::invalid_argument thrown by the parser: trtexec prints what() after [E]."""


def _stoi(text: str, what: str = "stoi") -> int:
    m = re.match(r"\s*[+-]?\d+", text)
    if not m:
        raise _ParseError(what)
    return int(m[0])


def _stof(text: str, what: str = "stof") -> float:
    m = re.match(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|\s*[+-]?(inf|nan)", text, re.I)
    if not m:
        raise _ParseError(what)
    return float(m[0])


def _split(text: str, sep: str) -> list[str]:
    """splitToStringVec (sampleUtils.cpp): '' -> [], a trailing separator adds nothing, 'a,,b' -> ['a', '', 'b']."""
    out, start = [], 0
    while start < len(text):
        end = text.find(sep, start)
        end = len(text) if end < 0 else end
        out.append(text[start:end])
        start = end + 1
    return out


def _split_name_value(item: str) -> tuple[str, str]:
    """splitNameAndValue: \'name\':value, else everything before the LAST ':' is the name (one part: both)."""
    quoted = _split(item, "'")
    if len(quoted) != 1:
        if len(quoted) != 3:
            raise _ParseError(
                f"Found invalid number of 's when parsing {item}. Expected: 2, received: {len(quoted) - 1}"
            )
        return quoted[0] + quoted[1], quoted[2][1:]
    parts = _split(item, ":")
    if not parts:
        raise _ParseError(f"empty name:value item in {item!r}")  # the C++ reads past an empty vector here
    return (":".join(parts[:-1]) if len(parts) > 1 else parts[0]), parts[-1]


def _check_value(name: str, spec: dict, value: str, table: dict) -> None:
    kind = spec["kind"]
    if kind == "int":
        _stoi(value)
    elif kind == "float":
        _stof(value, "stod" if spec["cpp_type"] == "double" else "stof")
    elif kind == "shapes":
        for item in _split(value, ","):
            _, dims = _split_name_value(item)
            for d in _split(dims, "x"):
                _stoi(d, f"stoi (failed to parse {name}: please double check your input string)")
    elif kind in ("layer_precisions", "layer_output_types"):
        for item in _split(value, ","):
            _, types = _split_name_value(item)
            for t in _split(types, "+") if kind == "layer_output_types" else [types]:
                if t not in table["data_types"]:
                    raise _ParseError(f"Invalid DataType {t}")
    if name == "--precisionConstraints" and value and value not in table["precision_constraints"]:
        raise _ParseError(f"Unknown precision constraints: {value}")


def parse(table: dict, words: list[str]) -> tuple[dict[str, object], list[tuple[str, str]]]:
    """(options read: name -> value, or list of values for a repeated one; the words left over) — or _ParseError."""
    left = []
    for word in words:
        name, eq, value = word.partition("=")
        left.append((name, value if eq else ""))
    read: dict[str, object] = {}
    for name, spec in table["options"].items():
        if not spec["consumed"] or name in ("--help", "-h"):
            continue
        found = [i for i, (n, _) in enumerate(left) if n == name]
        if not found:
            continue
        take = found if spec["repeated"] else found[:1]
        values = [left[i][1] for i in take]
        for v in values:
            _check_value(name, spec, v, table)
        read[name] = values if spec["repeated"] else values[0]
        left = [item for i, item in enumerate(left) if i not in take]
    if "--onnx" not in read and "--loadEngine" not in read:
        raise _ParseError("Model missing or format not recognized")
    if "--maxBatch" in table["options"] and ("--batch" in read or "--maxBatch" in read) and "--onnx" in read:
        raise _ParseError(
            "The --batch and --maxBatch flags should not be used when the input model is ONNX or when dynamic shapes "
            "are provided. Please use --optShapes and --shapes to set input shapes instead."
        )
    return read, left


def _stamp() -> str:
    return time.strftime("[%m/%d/%Y-%H:%M:%S] ")


def _help(table: dict) -> str:
    return "\n".join(f"  {name}" for name in table["help_lists"]) + "\n"


def main(argv: list[str]) -> int:
    release = os.environ.get("TRTEXEC_STAND_IN_RELEASE", "")
    if release not in RELEASES:
        print(f"trtexec stand-in: TRTEXEC_STAND_IN_RELEASE must be one of {', '.join(RELEASES)}", file=sys.stderr)
        return 3
    table = load(release)
    banner = table["banner"]
    version = os.environ.get("TRTEXEC_STAND_IN_VERSION") or table["tensorrt_version"]
    major, minor, patch, build = ([int(p) for p in version.split(".")] + [0, 0, 0, 0])[:4]
    mult = 1000 if banner["code_formula"].startswith("major*1000 ") else 10000
    name = f"TensorRT.trtexec [TensorRT v{major * mult + minor * 100 + patch}]" + (
        f" [b{build}]" if banner["build_tag"] else ""
    )
    cmdline = " ".join(argv)
    out, err = sys.stdout, sys.stderr
    print(f"&&&& RUNNING {name} # {cmdline}", file=out, flush=True)
    words = argv[1:]
    if any(w.partition("=")[0] in ("--help", "-h") for w in words):
        out.write(_help(table))
        return 0
    if not words:
        out.write(_help(table))
        print(f"&&&& PASSED {name} # {cmdline}", file=out)
        return 0
    unknown = table["unknown_option"]

    def fail(lines: list[str]) -> int:
        out.write(_help(table))
        for line in lines:
            print(f"{_stamp()}{unknown['log_prefix']}{line}", file=err, flush=True)
        if unknown["failed_line"]:
            print(f"&&&& FAILED {name} # {cmdline}", file=out)
        return unknown["exit_code"]

    try:
        read, left = parse(table, words)
    except _ParseError as exc:
        return fail([str(exc)])
    if left:
        return fail([unknown["message"].format(name=n, value=v) for n, v in left])
    if log := os.environ.get("TRTEXEC_STAND_IN_LOG"):
        Path(log).write_text(json.dumps({"release": release, "argv": words, "options": read}, indent=1))
    say = lambda line: print(f"{_stamp()}[I] {line}", file=out, flush=True)  # noqa: E731
    say(f"TensorRT version: {major}.{minor}.{patch}")
    say(f"Selected Device: {os.environ.get('TRTEXEC_STAND_IN_GPU', 'NVIDIA Jetson Orin')}")
    say(f"Compute Capability: {os.environ.get('TRTEXEC_STAND_IN_CC', '8.7')}")
    onnx = read.get("--onnx")
    if isinstance(onnx, str) and not Path(onnx).is_file():
        print(f"{_stamp()}[E] Failed to parse onnx file", file=err)
        print(f"&&&& FAILED {name} # {cmdline}", file=out)
        return 1
    if os.environ.get("TRTEXEC_STAND_IN_FAIL"):
        print(f"{_stamp()}[E] Error[4]: engine build failed (TRTEXEC_STAND_IN_FAIL)", file=err)
        print(f"&&&& FAILED {name} # {cmdline}", file=out)
        return 1
    engine = read.get("--saveEngine")
    if isinstance(engine, str) and engine:
        Path(engine).write_text(f"engine built by the trtexec {release} stand-in from {onnx}\n")
        say(f"Engine saved to {engine}")
    cache = read.get("--timingCacheFile")
    if isinstance(cache, str) and cache:
        Path(cache).write_bytes(b"timing cache of the stand-in\n")
    print(f"&&&& PASSED {name} # {cmdline}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
