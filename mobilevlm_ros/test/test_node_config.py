"""config/mobilevlm.yaml, the launch file and the declared parameters cannot drift apart."""

import ast
from pathlib import Path

import yaml

from mobilevlm_ros.ros.parameters import SPECS

PACKAGE = Path(__file__).resolve().parents[1]
DECLARED = {spec.name: spec.default for spec in SPECS}


def test_config_file_documents_exactly_the_declared_parameters_with_their_defaults():
    config = yaml.safe_load((PACKAGE / "config" / "mobilevlm.yaml").read_text())
    values = config["mobilevlm_node"]["ros__parameters"]
    assert values == DECLARED


def test_every_parameter_in_the_config_file_has_a_comment():
    lines = (PACKAGE / "config" / "mobilevlm.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if ":" in stripped and not stripped.startswith("#") and line.startswith("    ") and stripped.split(":")[0] in DECLARED:
            assert lines[index - 1].strip().startswith("#"), f"{stripped.split(':')[0]} has no comment"


def test_launch_file_compiles_and_sets_only_declared_parameters():
    source = (PACKAGE / "launch" / "mobilevlm.launch.py").read_text()
    tree = ast.parse(compile(source, "mobilevlm.launch.py", "exec", ast.PyCF_ONLY_AST))
    arguments = {
        node.args[0].value for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DeclareLaunchArgument"
    }
    assert arguments == {"model_path", "camera_topic", "params_file", "namespace", "use_compressed"}
    parameters = [
        keyword.value for node in ast.walk(tree) if isinstance(node, ast.Call)
        for keyword in node.keywords if keyword.arg == "parameters"
    ]
    assert parameters, "the launch file passes no parameters"
    set_names = {key.value for value in parameters for node in ast.walk(value) if isinstance(node, ast.Dict) for key in node.keys}
    assert set_names and set_names <= DECLARED.keys()
    executables = {
        keyword.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
        for keyword in node.keywords if keyword.arg == "executable"
    }
    assert executables == {"mobilevlm_node"}


def test_readme_documents_every_parameter():
    readme = (PACKAGE.parent / "README.md").read_text()
    assert [name for name in DECLARED if f"| `{name}` |" not in readme] == []
