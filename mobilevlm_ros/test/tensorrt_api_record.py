"""Write tensorrt_api.json: which names the TensorRT Python bindings define in each release, read from a git checkout of
NVIDIA/TensorRT (its pybind11 sources at the release tags).

    python tensorrt_api_record.py /path/to/TensorRT > tensorrt_api.json

For every class and enum that our builder and runtime touch it records the members the bindings declare
(`.value("X"` of an enum, `.def("x"` / `.def_property("x"` / `.def_readwrite("x"` ... of a class), plus the module's
top-level names. test_tensorrt_gating.py builds a stand-in `tensorrt` module from each entry. Add a release by adding its
tag to RELEASES and running this again; the file names the tag and the source files of every entry.
"""

import json
import re
import subprocess
import sys

# (label, tag in NVIDIA/TensorRT, the version string that release's `tensorrt.__version__` starts with, where it ships)
RELEASES = [
    ("8.6", "v8.6.1", "8.6.1", "JetPack 6.0 (8.6.2); x86 pip 8.6.1"),
    ("10.3", "v10.3.0", "10.3.0", "JetPack 6.1 / 6.2"),
    ("10.16", "v10.16", "10.16.0", "x86 pip, last 10.x"),
    ("11.0", "v11.0", "11.0.0", "x86 pip (not JetPack)"),
    ("11.1", "v11.1", "11.1.0", "x86 pip (not JetPack)"),
]
SOURCES = ["python/src/infer/pyCore.cpp", "python/src/infer/pyGraph.cpp", "python/src/infer/pyInt8.cpp",
           "python/src/infer/pyFoundationalTypes.cpp", "python/src/parsers/pyOnnx.cpp"]
INIT = "python/packaging/bindings_wheel/tensorrt/__init__.py"
# What our code touches (export/tensorrt.py, runtime/tensorrt.py, doctor.py), and ILayer for the per-layer precision API.
CLASSES = ["Builder", "NetworkDefinitionCreationFlag", "INetworkDefinition", "OnnxParser", "IBuilderConfig", "BuilderFlag",
           "MemoryPoolType", "IOptimizationProfile", "ITimingCache", "IHostMemory", "IInt8EntropyCalibrator2", "ILayer",
           "Runtime", "ICudaEngine", "IExecutionContext", "TensorIOMode", "DataType"]
URL = "https://github.com/NVIDIA/TensorRT/blob/{tag}/{path}"
ABOUT = ("Names the TensorRT Python bindings define in each release, read from NVIDIA/TensorRT's pybind11 sources at the "
         "release tag (written by tensorrt_api_record.py). test_tensorrt_gating.py checks OUR version gating against it, "
         "not TensorRT itself.")


def show(repo: str, tag: str, path: str) -> str:
    result = subprocess.run(["git", "-C", repo, "show", f"{tag}:{path}"], capture_output=True, text=True)
    return result.stdout


def statement(source: str, start: int) -> str:
    """The C++ statement starting at `start` (to its `;` outside brackets), string and comment contents left out."""
    out, depth, i = [], 0, start
    while i < len(source):
        if source.startswith("//", i):
            i = source.find("\n", i) if source.find("\n", i) >= 0 else len(source)
            continue
        if source.startswith("/*", i):
            i = source.find("*/", i) + 2
            continue
        raw = re.match(r'R"([^(]*)\(', source[i:i + 40])
        if raw:  # raw string literal: skip it whole
            i = source.find(")" + raw.group(1) + '"', i) + len(raw.group(1)) + 2
            continue
        char = source[i]
        if char == '"':
            end = i + 1
            while source[end] != '"':
                end += 2 if source[end] == "\\" else 1
            out.append(source[i:end + 1])
            i = end + 1
            continue
        depth += char in "([{"
        depth -= char in ")]}"
        if char == ";" and depth <= 0:
            break
        out.append(char)
        i += 1
    return "".join(out)


def record(repo: str, tag: str) -> tuple[dict[str, dict], list[str]]:
    classes: dict[str, dict] = {}
    module: set[str] = {"__version__", "Logger", "ILogger"}
    for path in SOURCES:
        source = show(repo, tag, path)
        module |= set(re.findall(r'm\.attr\("(\w+)"\)', source))
        for match in re.finditer(r'py::(enum_|class_)<[^;]*?>\s*\(\s*m\s*,\s*"(\w+)"', source):
            kind, name = match.groups()
            module.add(name)
            body = statement(source, match.start())
            if kind == "enum_":
                pattern = r'\.value\(\s*"(\w+)"'
            else:
                pattern = r'\.def(?:_property|_property_readonly|_readwrite|_readonly|_static)?\(\s*"(\w+)"'
            members = list(dict.fromkeys(re.findall(pattern, body)))
            if name in CLASSES:
                entry = classes.setdefault(name, {"members": [], "source": URL.format(tag=tag, path=path)})
                entry["members"] += [m for m in members if m not in entry["members"]]
    # Logger: pybind class DefaultLogger named "Logger" (min_severity, log), its severities copied onto it by __init__.py.
    core = show(repo, tag, SOURCES[0])
    severities = re.findall(r'\.value\("(\w+)"', statement(core, core.index('"Severity"')))
    classes["Logger"] = {"members": ["min_severity", "log", "Severity", *severities],
                         "source": URL.format(tag=tag, path=SOURCES[0]) + " ; " + URL.format(tag=tag, path=INIT)}
    return classes, sorted(module)


def main() -> None:
    repo = sys.argv[1]
    versions = {}
    for label, tag, version, ships in RELEASES:
        classes, module = record(repo, tag)
        missing = [name for name in CLASSES if name not in classes]
        versions[label] = {"tag": tag, "version": version, "ships_in": ships, "module": module,
                           "classes": {name: classes[name] for name in sorted(classes)}, "absent_classes": missing}
    text = json.dumps({"about": ABOUT, "versions": versions}, indent=1)
    # One line per list of names: readable in a diff, a new member is one changed line.
    text = re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
