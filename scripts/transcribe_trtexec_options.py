#!/usr/bin/env python3
"""Transcribe the options each TensorRT release's trtexec accepts, from its own source, into JSON test oracles.

Usage (from a clone of github.com/NVIDIA/TensorRT; --git-dir may be its .git or a bare mirror)::

    python scripts/transcribe_trtexec_options.py --git-dir /path/to/TensorRT.git \
        --ref release/8.5 --ref release/8.6 --ref release/10.3 --ref release/10.13 --ref release/11.1 \
        --out-dir tests/data/trtexec

Reads, at each ref, ``samples/common/sampleOptions.cpp`` (the option parser), ``samples/common/sampleOptions.h``
(the types of the members options are read into), ``samples/trtexec/trtexec.cpp`` (what main() does with what the
parser leaves over), ``samples/common/logging.h`` (the banner and which stream errors go to) and the version headers
under ``include/`` (the version number in the banner). Nothing is typed in by hand: an option is in the list when a
function reachable from ``AllOptions::parse`` (or ``parseHelp``) passes its name as a string literal to
``getAndDelOption`` / ``getAndDelNegOption`` / ``getAndDelRepeatedOption`` / ``getAndDelOptionWithPosition`` /
``getAndDelOptionBehind`` or to a helper that does (``getShapesBuild``, ``getLayerPrecisions``, a lambda such as
``getFormats``); its kind comes from the C++ type of the variable it is read into (``bool``: a flag whose value is
ignored, as ``stringToValue<bool>`` returns true whatever follows '='). The help text (``*::help``) is transcribed
apart, so an option the help shows but the parser no longer takes (or the reverse) is visible. A fact the script
cannot find in the source where it expects it is an error, not a default.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections import OrderedDict
from pathlib import Path

REPO_URL = "https://github.com/NVIDIA/TensorRT"
OPTIONS_CPP = "samples/common/sampleOptions.cpp"
OPTIONS_H = "samples/common/sampleOptions.h"
TRTEXEC_CPP = "samples/trtexec/trtexec.cpp"
LOGGING_H = "samples/common/logging.h"
VERSION_HEADERS = ("include/NvInferVersion.h", "include/NvInferRuntimeBase.h", "include/NvInferRuntimeCommon.h")

_OPTION_LITERAL = re.compile(r'^"(-{1,2}[A-Za-z][A-Za-z0-9_]*)"$')
_CONSUMERS = {
    "getAndDelOption",
    "getAndDelNegOption",
    "getAndDelRepeatedOption",
    "getAndDelOptionWithPosition",
    "getAndDelOptionBehind",
}
_KEYWORDS = {"if", "while", "for", "switch", "return", "catch", "sizeof", "static_assert", "decltype"}
_INT_TYPES = {"int", "int32_t", "int64_t", "uint32_t", "uint64_t", "size_t", "long", "unsigned"}
# what a helper that reads an option makes of its value
_HELPER_KINDS = {
    "getShapesBuild": "shapes",
    "getShapesInference": "shapes",
    "getLayerPrecisions": "layer_precisions",
    "getLayerOutputTypes": "layer_output_types",
}
_SECTIONS = {
    "BaseModelOptions": "model",
    "ModelOptions": "model",
    "UffInput": "model",
    "BuildOptions": "build",
    "SystemOptions": "system",
    "InferenceOptions": "inference",
    "TuningOptions": "tuning",
    "ReportingOptions": "reporting",
    "SafeBuilderOptions": "safe",
    "AllOptions": "all",
}


def git_show(git_dir: Path, ref: str, path: str) -> str | None:
    done = subprocess.run(
        ["git", "-C", str(git_dir), "show", f"{ref}:{path}"], capture_output=True, text=True, errors="replace"
    )
    return done.stdout if done.returncode == 0 else None


def git_out(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(git_dir), *args], capture_output=True, text=True, check=True).stdout.strip()


# --- a small C++ reader: comments out, strings kept, functions by brace matching ----------------------------------


def strip_comments(text: str) -> str:
    """Comments replaced by spaces (newlines kept, so line numbers hold); string and char literals untouched."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _match(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket closing the one at ``start`` (string literals skipped)."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < len(text) and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced {open_} at {start}")


def functions(code: str) -> dict[str, list[tuple[str, int, int]]]:
    """name -> [(parameter text, body start, body end)] for every function defined at column 0."""
    found: dict[str, list[tuple[str, int, int]]] = {}
    for m in re.finditer(r"^(?![\s#}])[^\n;{}()]*?\b((?:\w+::)?~?\w+)\s*\(", code, re.M):
        name = m[1]
        if name.split("::")[-1] in _KEYWORDS:
            continue
        try:
            close = _match(code, m.end() - 1, "(", ")")
        except ValueError:
            continue
        rest = re.match(r"\s*(?:const\s*)?(?:noexcept\s*)?(?:override\s*)?\{", code[close:])
        if not rest:
            continue
        body_start = close + rest.end() - 1
        found.setdefault(name, []).append((code[m.end() : close - 1], body_start, _match(code, body_start, "{", "}")))
    return found


def split_args(text: str) -> list[str]:
    args, depth, cur, i = [], 0, [], 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < len(text) and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            cur.append(text[i : j + 1])
            i = j + 1
            continue
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        if c == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if "".join(cur).strip():
        args.append("".join(cur).strip())
    return args


def conditions_by_line(code: str) -> list[str | None]:
    """For each line, the preprocessor condition around it ('!TRT_WINML', 'ENABLE_UNIFIED_BUILDER', ...)."""
    stack: list[str] = []
    out: list[str | None] = []
    for line in code.split("\n"):
        s = line.strip()
        if m := re.match(r"#\s*if(n?def)?\s+(.*)", s):
            cond = m[2].strip()
            stack.append(("!" if m[1] == "ndef" else "") + cond)
        elif re.match(r"#\s*else", s) and stack:
            top = stack.pop()
            stack.append(top[1:] if top.startswith("!") else "!" + top)
        elif re.match(r"#\s*endif", s) and stack:
            stack.pop()
        out.append(" && ".join(stack) if stack else None)
    return out


_DECL = re.compile(
    r"^\s*(?:static\s+)?(?:constexpr\s+)?((?:[\w:]+)(?:<[^;{}()]*>)?)\s+(\w+)\s*(?:\{[^;]*\}|=[^;]*)?;", re.M
)


def member_types(header: str) -> dict[str, dict[str, str]]:
    """class -> {member -> declared C++ type}, from declarations such as ``bool fp16{false};`` in each struct/class
    of the header ("" holds every declaration, first one wins, for names no class claims)."""
    code = strip_comments(header)
    out: dict[str, dict[str, str]] = {"": {}}
    for m in _DECL.finditer(code):
        if m[1] not in ("return", "using", "typedef", "namespace", "class", "struct", "friend"):
            out[""].setdefault(m[2], m[1])
    for m in re.finditer(r"\b(?:struct|class)\s+(\w+)[^;{()]*\{", code):
        body = code[m.end() - 1 : _match(code, m.end() - 1, "{", "}")]
        out.setdefault(m[1], {})
        for d in _DECL.finditer(body):
            if d[1] not in ("return", "using", "typedef", "namespace", "class", "struct", "friend"):
                out[m[1]].setdefault(d[2], d[1])
    return out


def local_type(body: str, var: str) -> str | None:
    m = re.search(r"((?:[\w:]+)(?:<[^;{}()]*>)?)\s+" + re.escape(var) + r"\s*(?:[{;=(]|$)", body, re.M)
    return m[1] if m and m[1] not in ("return", "auto", "else") else None


def kind_of(cpp_type: str | None) -> str:
    if cpp_type is None:
        return "value"
    base = cpp_type.replace("std::", "").replace("const", "").strip()
    if base == "bool":
        return "flag"
    if base in _INT_TYPES:
        return "int"
    if base in ("float", "double"):
        return "float"
    if base == "string":
        return "string"
    return "value"


# --- the transcription ------------------------------------------------------------------------------------------


def transcribe_options(cpp: str, header: str) -> tuple[OrderedDict, list[str]]:
    code = strip_comments(cpp)
    defs = functions(code)
    conds = conditions_by_line(code)
    members = member_types(header)
    arg_functions = {name for name, items in defs.items() if any("Arguments&" in p for p, _, _ in items)}
    free_helpers = {n for n in arg_functions if "::" not in n}
    # member name -> class, for `build.parse(arguments)`
    classes = {n.split("::")[0] for n in defs if n.endswith("::parse")}

    options: OrderedDict[str, dict] = OrderedDict()
    seen: set[str] = set()

    def visit(name: str, section: str) -> None:
        if name in seen or name not in defs:
            return
        seen.add(name)
        for _, start, end in defs[name]:
            body = code[start:end]
            lambdas = set(re.findall(r"auto\s+(\w+)\s*=\s*\[[^\]]*\]", body))
            for m in re.finditer(r"\b(\w+)(?:\.(parse))?\s*\(", body):
                callee = m[1]
                owner = name.split("::")[0] if "::" in name else ""
                scope = {**members[""], **members.get(owner, {})}
                if m[2] == "parse":
                    cls = scope.get(callee, "")
                    if cls in classes:
                        visit(f"{cls}::parse", _SECTIONS.get(cls, section) if section == "all" else section)
                    continue
                if callee in _KEYWORDS:
                    continue
                close = _match(body, m.end() - 1, "(", ")")
                args = split_args(body[m.end() : close - 1])
                if callee in free_helpers and callee not in _CONSUMERS and callee != name:
                    visit(callee, section)
                literals = [a for a in args if _OPTION_LITERAL.match(a)]
                if not literals or not (callee in _CONSUMERS or callee in free_helpers or callee in lambdas):
                    continue
                option = _OPTION_LITERAL.match(literals[0])[1]  # type: ignore[index]
                line = code.count("\n", 0, start + m.start())
                in_loop = bool(re.search(r"while\s*\(\s*!?\s*$", body[: m.start()]))
                if callee in _CONSUMERS:
                    var = re.sub(r"^[*&]", "", args[-1]) if len(args) >= 3 else ""
                    var = var.split(".")[-1].split("->")[-1]
                    cpp_type = local_type(body, var) or scope.get(var)
                    if callee == "getAndDelNegOption":
                        cpp_type = "bool"
                    repeated = callee == "getAndDelRepeatedOption" or in_loop
                    if callee == "getAndDelRepeatedOption" and cpp_type:
                        inner = re.match(r"(?:std::)?vector<(.+)>$", cpp_type)
                        cpp_type = inner[1] if inner else cpp_type
                else:
                    cpp_type, repeated = None, in_loop
                    helper_bodies = [code[s:e] for _, s, e in defs.get(callee, [])]
                    repeated = repeated or any(
                        "getAndDelRepeatedOption(arguments, argument" in b for b in helper_bodies
                    )
                kind = _HELPER_KINDS.get(callee, kind_of(cpp_type))
                entry = options.setdefault(
                    option,
                    {
                        "section": section,
                        "kind": kind,
                        "cpp_type": cpp_type,
                        "read_by": [],
                        "consumed": False,
                        "repeated": False,
                        "condition": conds[line],
                        "lines": [],
                    },
                )
                if entry["kind"] == "value" and kind != "value" or callee in _HELPER_KINDS:
                    entry["kind"], entry["cpp_type"] = kind, cpp_type
                entry["lines"].append(line + 1)
                entry["read_by"] = sorted({*entry["read_by"], callee})
                entry["consumed"] = entry["consumed"] or callee != "getOption"
                entry["repeated"] = entry["repeated"] or repeated
                if entry["condition"] and not conds[line]:
                    entry["condition"] = None  # read unconditionally somewhere
        return

    visit("parseHelp", "help")
    visit("AllOptions::parse", "all")
    if "AllOptions::parse" not in seen or "BuildOptions::parse" not in seen:
        raise SystemExit("AllOptions::parse / BuildOptions::parse not found: the file's layout changed")
    # help text: option names at the start of a help line ("  --fp16   Enable ...", "  --help, -h   Print ..."), in
    # the help functions AllOptions::help calls (not those of the other tools sharing the file, e.g. SafeBuilderOptions)
    documented: list[str] = []
    todo, done = ["AllOptions::help"], set()
    while todo:
        name = todo.pop(0)
        if name in done or name not in defs:
            continue
        done.add(name)
        for _, start, end in defs[name]:
            body = code[start:end]
            calls = re.findall(r"\b(?:(\w+)::help|(helpHelp))\s*\(", body)
            todo[:0] = [f"{c}::help" if c else h for c, h in calls]  # depth first: the order the help prints in
            for lit in re.findall(r'"((?:[^"\\]|\\.)*)"', body):
                if m := re.match(r"\s{2,}((?:-{1,2}[A-Za-z][A-Za-z0-9_]*)(?:,\s*-{1,2}[A-Za-z][A-Za-z0-9_]*)*)", lit):
                    for opt in re.split(r",\s*", m[1]):
                        if opt not in documented:
                            documented.append(opt)
    if "AllOptions::help" not in done:
        raise SystemExit("AllOptions::help not found")
    return OrderedDict(sorted(options.items(), key=lambda kv: kv[0].lower())), documented


def _data_types(cpp: str) -> list[str]:
    """The type names --layerPrecisions/--layerOutputTypes take ([] where no option parses a DataType: 11.x)."""
    m = re.search(r"stringToValue<nvinfer1::DataType>.*?strToDT\{(.*?)\};", cpp, re.S)
    return re.findall(r'\{"(\w+)",', m[1]) if m else []


def _precision_constraints(cpp: str) -> list[str]:
    m = re.search(r"precisionConstraintsMap\s*=\s*\{(.*?)\};", cpp, re.S)
    return re.findall(r'\{"(\w+)",', m[1]) if m else []


def transcribe_behaviour(git_dir: Path, ref: str, cpp: str) -> dict:
    """What trtexec does around the parser: argv splitting, the banner, an unknown option, the exit code."""
    trtexec = git_show(git_dir, ref, TRTEXEC_CPP)
    logging = git_show(git_dir, ref, LOGGING_H)
    if trtexec is None or logging is None:
        raise SystemExit(f"{ref}: {TRTEXEC_CPP} or {LOGGING_H} missing")
    argmap = re.search(r"Arguments argsToArgumentsMap\(.*?\n\}", cpp, re.S)
    if not argmap or "strchr(argv[i], '=')" not in argmap[0]:
        raise SystemExit(f"{ref}: argsToArgumentsMap does not split argv at the first '=' any more")
    if "arguments.emplace(argv[i], " not in argmap[0]:
        raise SystemExit(f"{ref}: argsToArgumentsMap no longer keeps a '='-less word as a name with an empty value")
    # the version number and the banner
    version: dict[str, int] = {}
    formula = None
    for path in VERSION_HEADERS:
        text = git_show(git_dir, ref, path) or ""
        for part in ("MAJOR", "MINOR", "PATCH", "BUILD"):
            m = re.search(rf"#define\s+(?:NV_TENSORRT_{part}|TRT_{part}_ENTERPRISE)\s+(\d+)", text)
            if m and part.lower() not in version:
                version[part.lower()] = int(m[1])
        if re.search(r"NV_TENSORRT_MAJOR\s*\*\s*1000\)\s*\+\s*\(NV_TENSORRT_MINOR\s*\*\s*100\)", text):
            formula = "major*1000 + minor*100 + patch"
        elif re.search(r"\(major\)\s*\*\s*10000L\s*\+\s*\(minor\)\s*\*\s*100L\s*\+\s*\(patch\)", text):
            formula = "major*10000 + minor*100 + patch"
    if formula is None or len(version) < 4:
        raise SystemExit(f"{ref}: NV_TENSORRT_VERSION's formula or the version numbers not found")
    mult = 1000 if formula.startswith("major*1000 ") else 10000
    code = version["major"] * mult + version["minor"] * 100 + version["patch"]
    if not re.search(r'" \[TensorRT v" \+ std::to_string\(NV_TENSORRT_VERSION\) \+ "\]', logging):
        raise SystemExit(f"{ref}: the banner's '[TensorRT vN]' not found in logging.h")
    build_tag = bool(re.search(r'"\] \[b"\s*\+\s*std::to_string\(NV_TENSORRT_BUILD\)', logging))
    if not re.search(r'"&&&& " << testResultString\(result\) << " " << testAtom.mName << " # "', logging):
        raise SystemExit(f"{ref}: the '&&&& RESULT name # cmdline' line not found in logging.h")
    errors_to_stderr = bool(re.search(r"severity >= Severity::kINFO \? std::cout : std::cerr", logging))
    # main(): the unknown-option report and what follows it
    unknown = re.search(r'gLogError << "Unknown option: " << arg\.first << " " << arg\.second(\.first)?', trtexec)
    if not unknown:
        raise SystemExit(f"{ref}: the 'Unknown option: ' report not found in trtexec.cpp")
    after = trtexec[unknown.end() :]
    failed_block = re.search(r"if \(failed\)\s*\{(.*?)\}", after, re.S)
    if not failed_block:
        raise SystemExit(f"{ref}: the 'if (failed)' block after the unknown-option report not found")
    reports_fail = "reportFail(" in failed_block[1]
    if not reports_fail and "return EXIT_FAILURE" not in failed_block[1]:
        raise SystemExit(f"{ref}: the failed-parse path neither reports a failure nor returns EXIT_FAILURE")
    return {
        "tensorrt_version": f"{version['major']}.{version['minor']}.{version['patch']}.{version['build']}",
        "argv": {
            "name_value_split": "at the first '=' (argsToArgumentsMap); a word without '=' is a name with an "
            "empty value, so '--saveEngine model.engine' is --saveEngine='' plus an unknown option 'model.engine'",
            "flag_values": "a bool option ignores its value (stringToValue<bool> returns true)",
            "duplicates": "a name not read by a repeated reader is taken once; a second copy is left over",
        },
        "banner": {
            "code": code,
            "code_formula": formula,
            "build_tag": build_tag,
            "build": version["build"],
            "line": "&&&& RUNNING TensorRT.trtexec [TensorRT v{code}]"
            + (" [b{build}]" if build_tag else "")
            + " # {cmdline}",
            "stream": "stdout",
        },
        "unknown_option": {
            "message": "Unknown option: {name} {value}",
            "log_prefix": "[E] ",
            "stream": "stderr" if errors_to_stderr else "stdout",
            "failed_line": reports_fail,
            "exit_code": 1,
        },
    }


def transcribe(git_dir: Path, ref: str) -> dict:
    cpp = git_show(git_dir, ref, OPTIONS_CPP)
    header = git_show(git_dir, ref, OPTIONS_H)
    if cpp is None or header is None:
        raise SystemExit(f"{ref}: {OPTIONS_CPP} or {OPTIONS_H} not in this repository")
    commit = git_out(git_dir, "rev-parse", f"{ref}^{{commit}}")
    options, documented = transcribe_options(cpp, header)
    behaviour = transcribe_behaviour(git_dir, ref, cpp)
    return {
        "_comment": "Transcribed by scripts/transcribe_trtexec_options.py from the source below; do not edit by "
        "hand, re-run the script.",
        "tool": "trtexec",
        "repository": REPO_URL,
        "ref": ref,
        "commit": commit,
        "commit_date": git_out(git_dir, "log", "-1", "--format=%cs", commit),
        "source": f"{REPO_URL}/blob/{commit}/{OPTIONS_CPP}",
        "files": [OPTIONS_CPP, OPTIONS_H, TRTEXEC_CPP, LOGGING_H, *VERSION_HEADERS],
        **behaviour,
        "data_types": _data_types(cpp),
        "precision_constraints": _precision_constraints(cpp),
        "options": options,
        "help_lists": documented,
        "help_only": [o for o in documented if o not in options],
        "undocumented": [o for o in options if o not in documented],
    }


def dump(record: dict) -> str:
    """JSON with one line per option, so a diff between two releases reads option by option."""
    head = {k: v for k, v in record.items() if k != "options"}
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in record["options"].items())
    return json.dumps(head, indent=1)[:-2] + ',\n "options": {\n' + rows + "\n }\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-dir", type=Path, required=True, help="a clone (or bare git dir) of NVIDIA/TensorRT")
    parser.add_argument("--ref", action="append", required=True, help="release branches, oldest first")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    previous: dict | None = None
    for ref in args.ref:
        record = transcribe(args.git_dir, ref)
        if previous is not None:
            record["removed_since"] = {
                "ref": previous["ref"],
                "options": [o for o in previous["options"] if o not in record["options"]],
            }
            record["added_since"] = {
                "ref": previous["ref"],
                "options": [o for o in record["options"] if o not in previous["options"]],
            }
        line = ref.rsplit("/", 1)[-1]
        out = args.out_dir / f"trtexec_options_{line}.json"
        out.write_text(dump(record), encoding="utf-8")
        print(
            f"{out}: TensorRT {record['tensorrt_version']} ({record['commit'][:10]}), {len(record['options'])} options"
            + (f", {len(record['removed_since']['options'])} removed since {previous['ref']}" if previous else "")
        )
        previous = record


if __name__ == "__main__":
    main()
