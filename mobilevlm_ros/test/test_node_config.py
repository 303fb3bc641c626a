"""config/mobilevlm.yaml, the launch file and the declared parameters cannot drift apart."""

import ast
from pathlib import Path

import yaml

from mobilevlm_ros.ros.parameters import SPECS

PACKAGE = Path(__file__).resolve().parents[1]
DECLARED = {spec.name: spec.default for spec in SPECS}


def test_config_file_documents_exactly_the_declared_parameters_with_their_defaults():
    config = yaml.safe_load((PACKAGE / "config" / "mobilevlm.yaml").read_text())
    assert list(config) == ["/**"], "the key /** keeps these defaults for the node in any namespace"
    values = config["/**"]["ros__parameters"]
    assert values == DECLARED


def test_every_parameter_in_the_config_file_has_a_comment():
    lines = (PACKAGE / "config" / "mobilevlm.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if ":" in stripped and not stripped.startswith("#") and line.startswith("    ") and stripped.split(":")[0] in DECLARED:
            assert lines[index - 1].strip().startswith("#"), f"{stripped.split(':')[0]} has no comment"


def test_launch_file_compiles_and_sets_only_declared_parameters():
    """What the launch file does is tested through the real launch (test_launch.py); this reads it, so that a robot
    without ../shared/ros2-launch still checks the names it uses."""
    source = (PACKAGE / "launch" / "mobilevlm.launch.py").read_text()
    tree = ast.parse(compile(source, "mobilevlm.launch.py", "exec", ast.PyCF_ONLY_AST))
    arguments = {
        node.args[0].value for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DeclareLaunchArgument"
    }
    assert arguments == {"model_path", "camera_topic", "params_file", "namespace", "use_compressed", "use_sim_time",
                         "autostart", "fastdds_profile"}
    # Parameters the launch file sets over the params file: overrides["name"] = ..., and the names of a
    # `for name in (...)` loop that sets overrides[name]. use_sim_time is rclpy's own parameter.
    set_names = {
        node.slice.value for node in ast.walk(tree)
        if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "overrides" and isinstance(node.slice, ast.Constant)
    }
    for loop in (node for node in ast.walk(tree) if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple)):
        if any(isinstance(n, ast.Subscript) and getattr(n.value, "id", None) == "overrides" for n in ast.walk(loop)):
            set_names |= {element.value for element in loop.iter.elts}
    assert set_names == {"model_path", "use_sim_time", "autostart", "camera_transports"}
    assert set_names <= DECLARED.keys() | {"use_sim_time"}
    executables = {
        keyword.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
        for keyword in node.keywords if keyword.arg == "executable"
    }
    assert executables == {"mobilevlm_node"}


def test_readme_documents_every_parameter():
    readme = (PACKAGE.parent / "README.md").read_text()
    assert [name for name in DECLARED if f"| `{name}` |" not in readme] == []
