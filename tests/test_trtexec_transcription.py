"""scripts/transcribe_trtexec_options.py on a small repository laid out as NVIDIA/TensorRT is: what it takes as an
option (reachable from AllOptions::parse), what it leaves out (another tool's parser), the kinds, repeated and
conditional options, the banner and unknown-option facts it reads, and what one release removed from the one before.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="the script reads the sources with git")

OPTIONS_H = """
struct BuildOptions
{
    bool fp16{false};
    int32_t avgTiming{8};
    std::string engine;
    double workspace{-1.0};
    void parse(Arguments& arguments);
};
struct SystemOptions
{
    int32_t device{0};
    void parse(Arguments& arguments);
};
struct AllOptions
{
    BuildOptions build;
    SystemOptions system;
    void parse(Arguments& arguments);
};
"""

OPTIONS_CPP = """
namespace sample
{
namespace
{
template <>
nvinfer1::DataType stringToValue<nvinfer1::DataType>(const std::string& option)
{
    const std::unordered_map<std::string, nvinfer1::DataType> strToDT{{"fp32", nvinfer1::DataType::kFLOAT},
        {"fp16", nvinfer1::DataType::kHALF}};
    return strToDT.find(option)->second;
}

bool getShapesBuild(Arguments& arguments, ShapeProfile& shapes, char const* argument)
{
    std::string list;
    return getAndDelOption(arguments, argument, list);
}
} // namespace

Arguments argsToArgumentsMap(int32_t argc, char* argv[])
{
    Arguments arguments;
    for (int32_t i = 1; i < argc; ++i)
    {
        auto valuePtr = strchr(argv[i], '=');
        if (valuePtr)
        {
            arguments.emplace(std::string(argv[i], valuePtr - argv[i]), std::string{valuePtr + 1});
        }
        else
        {
            arguments.emplace(argv[i], "");
        }
    }
    return arguments;
}

void BuildOptions::parse(Arguments& arguments)
{
    getAndDelOption(arguments, "--fp16", fp16);  // a "--commented" literal is not an option
    getAndDelOption(arguments, "--avgTiming", avgTiming);
    REMOVED_LINE
    getShapesBuild(arguments, shapes, "--minShapes");
    std::string precisionConstraintsString;
    getAndDelOption(arguments, "--precisionConstraints", precisionConstraintsString);
    const std::unordered_map<std::string, PrecisionConstraints> precisionConstraintsMap
        = {{"obey", PrecisionConstraints::kOBEY}, {"none", PrecisionConstraints::kNONE}};
    if (getAndDelOption(arguments, "--saveEngine", engine))
    {
        throw std::invalid_argument("--saveEngine");
    }
}

void SystemOptions::parse(Arguments& arguments)
{
    getAndDelOption(arguments, "--device", device);
    std::string pluginName;
#if !TRT_WINML
    while (getAndDelOption(arguments, "--staticPlugins", pluginName))
    {
        plugins.emplace_back(pluginName);
    }
#endif
}

bool parseHelp(Arguments& arguments)
{
    bool helpLong{false};
    getAndDelOption(arguments, "--help", helpLong);
    return helpLong;
}

void AllOptions::parse(Arguments& arguments)
{
    build.parse(arguments);
    system.parse(arguments);
}

void SafeBuilderOptions::parse(Arguments& arguments)
{
    getAndDelOption(arguments, "--serialized", serialized);
}

void BuildOptions::help(std::ostream& os)
{
    os << "=== Build Options ===" "\\n"
          "  --fp16                      Enable fp16" "\\n"
          "  --oldOption                 Still in the help" "\\n";
}

void AllOptions::help(std::ostream& os)
{
    BuildOptions::help(os);
}
} // namespace sample
"""

TRTEXEC_CPP = """
int main(int argc, char** argv)
{
    if (!args.empty())
    {
        for (auto const& arg : args)
        {
            sample::gLogError << "Unknown option: " << arg.first << " " << arg.second << std::endl;
        }
        failed = true;
        if (failed)
        {
            FAILED_PATH
        }
    }
}
"""

LOGGING_H = """
static std::ostream& severityOstream(Severity severity)
{
    return severity >= Severity::kINFO ? std::cout : std::cerr;
}
const std::string vname = name + " [TensorRT v" + std::to_string(NV_TENSORRT_VERSION) + "]BUILD_TAG;
severityOstream(Severity::kINFO) << "&&&& " << testResultString(result) << " " << testAtom.mName << " # "
"""

VERSION_H = "#define NV_TENSORRT_MAJOR {0}\n#define NV_TENSORRT_MINOR {1}\n#define NV_TENSORRT_PATCH 0\n"
VERSION_H += "#define NV_TENSORRT_BUILD 7\n"
FORMULA_8 = "= (NV_TENSORRT_MAJOR * 1000) + (NV_TENSORRT_MINOR * 100) + NV_TENSORRT_PATCH;\n"
FORMULA_10 = "#define NV_TENSORRT_VERSION_INT(major, minor, patch) ((major) *10000L + (minor) *100L + (patch) *1L)\n"


def _commit(repo: Path, branch: str, version: tuple[int, int], removed: bool, new_main: bool) -> None:
    files = {
        "samples/common/sampleOptions.h": OPTIONS_H,
        "samples/common/sampleOptions.cpp": OPTIONS_CPP.replace(
            "REMOVED_LINE", "" if removed else 'getAndDelOption(arguments, "--workspace", workspace);'
        ),
        "samples/trtexec/trtexec.cpp": TRTEXEC_CPP.replace(
            "FAILED_PATH", "return EXIT_FAILURE;" if new_main else "return sample::gLogger.reportFail(sampleTest);"
        ),
        "samples/common/logging.h": LOGGING_H.replace(
            "BUILD_TAG", ' [b" + std::to_string(NV_TENSORRT_BUILD) + "]"' if new_main else '"'
        ),
        "include/NvInferVersion.h": VERSION_H.format(*version),
        "include/NvInferRuntimeBase.h": FORMULA_10 if version[0] >= 10 else FORMULA_8,
    }
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "checkout", "-q", "-B", branch], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", branch], check=True)


def test_the_transcription_reads_what_the_parser_reads(tmp_path):
    repo = tmp_path / "TensorRT"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    _commit(repo, "release/8.5", (8, 5), removed=False, new_main=False)
    _commit(repo, "release/10.3", (10, 3), removed=True, new_main=True)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/transcribe_trtexec_options.py"),
            "--git-dir",
            str(repo),
            "--ref",
            "release/8.5",
            "--ref",
            "release/10.3",
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    old = json.loads((tmp_path / "out/trtexec_options_8.5.json").read_text())
    new = json.loads((tmp_path / "out/trtexec_options_10.3.json").read_text())
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "release/8.5"], capture_output=True, text=True
    ).stdout.strip()
    assert (old["ref"], old["commit"], old["tensorrt_version"]) == ("release/8.5", commit, "8.5.0.7")
    assert set(old["options"]) == {
        "--fp16",
        "--avgTiming",
        "--workspace",
        "--minShapes",
        "--precisionConstraints",
        "--saveEngine",
        "--device",
        "--staticPlugins",
        "--help",
    }  # not --serialized (another tool's parser), not the commented or thrown literals
    kinds = {name: (o["kind"], o["section"], o["repeated"]) for name, o in old["options"].items()}
    assert kinds["--fp16"] == ("flag", "build", False) and kinds["--avgTiming"] == ("int", "build", False)
    assert kinds["--workspace"] == ("float", "build", False) and kinds["--saveEngine"] == ("string", "build", False)
    assert kinds["--minShapes"] == ("shapes", "build", False) and kinds["--device"] == ("int", "system", False)
    assert kinds["--staticPlugins"] == ("string", "system", True)
    assert old["options"]["--staticPlugins"]["condition"] == "!TRT_WINML"
    assert old["data_types"] == ["fp32", "fp16"] and old["precision_constraints"] == ["obey", "none"]
    assert old["help_lists"] == ["--fp16", "--oldOption"] and old["help_only"] == ["--oldOption"]
    assert old["banner"]["code"] == 8500 and not old["banner"]["build_tag"]
    assert old["unknown_option"] == {
        "message": "Unknown option: {name} {value}",
        "log_prefix": "[E] ",
        "stream": "stderr",
        "failed_line": True,
        "exit_code": 1,
    }
    assert new["banner"]["code"] == 100300 and new["banner"]["build_tag"] and new["banner"]["build"] == 7
    assert new["unknown_option"]["failed_line"] is False
    assert new["removed_since"] == {"ref": "release/8.5", "options": ["--workspace"]}


def test_a_source_without_the_expected_parser_is_an_error(tmp_path):
    repo = tmp_path / "TensorRT"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    _commit(repo, "release/8.5", (8, 5), removed=False, new_main=False)
    cpp = repo / "samples/common/sampleOptions.cpp"
    cpp.write_text(cpp.read_text().replace("void AllOptions::parse", "void AllOptions::parseAll"))
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "renamed"], check=True
    )
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/transcribe_trtexec_options.py"),
            "--git-dir",
            str(repo),
            "--ref",
            "release/8.5",
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "AllOptions::parse" in done.stderr
    assert not (tmp_path / "out/trtexec_options_8.5.json").exists()
