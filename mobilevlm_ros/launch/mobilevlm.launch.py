"""Start mobilevlm_node: `ros2 launch mobilevlm_ros mobilevlm.launch.py model_path:=/opt/models/MobileVLM_V2-1.7B`.

Parameters come from `params_file` (default: the package's config/mobilevlm.yaml, whose `/**:` key applies in any
namespace). A launch argument overrides the file only when it is given: model_path, use_sim_time and autostart left
empty keep the file's values, and use_compressed:=true switches the (single) camera to `<camera_topic>/compressed`.

Arguments: model_path, params_file, namespace, camera_topic (remapped onto the node's `image` input),
use_compressed, use_sim_time, autostart, fastdds_profile (the Fast DDS XML profile for large frames; an exported
FASTDDS_DEFAULT_PROFILES_FILE wins; empty: none). Works with the launch of Humble, Jazzy and later.
"""

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "mobilevlm_ros"
TRUE, FALSE = ("true", "True", "1"), ("false", "False", "0")


def boolean(name: str, value: str) -> bool:
    if value not in TRUE + FALSE:
        raise ValueError(f"launch argument {name}:={value!r}: expected true or false")
    return value in TRUE


def node_action(context, *args, **kwargs) -> list:
    """The node, with the launch arguments that were given applied after the params file (so only they override it)."""
    argument = {name: LaunchConfiguration(name).perform(context).strip() for name in (
        "model_path", "params_file", "namespace", "camera_topic", "use_compressed", "use_sim_time", "autostart",
        "fastdds_profile")}
    overrides: dict = {}
    if argument["model_path"]:
        overrides["model_path"] = argument["model_path"]
    for name in ("use_sim_time", "autostart"):
        if argument[name]:
            overrides[name] = boolean(name, argument[name])
    compressed = boolean("use_compressed", argument["use_compressed"] or "false")
    if compressed:
        overrides["camera_transports"] = ["compressed"]
    remappings = []
    if argument["camera_topic"]:
        topic = argument["camera_topic"]
        remappings = [("image", topic), ("image/compressed", f"{topic}/compressed")]
    environment = {}
    if argument["fastdds_profile"]:
        environment["FASTDDS_DEFAULT_PROFILES_FILE"] = argument["fastdds_profile"]
    return [Node(
        package=PACKAGE,
        executable="mobilevlm_node",
        name="mobilevlm_node",
        namespace=argument["namespace"],
        parameters=[argument["params_file"], overrides] if overrides else [argument["params_file"]],
        remappings=remappings,
        additional_env=environment,
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description() -> LaunchDescription:
    share = Path(get_package_share_directory(PACKAGE))
    profile = str(share / "config" / "fastdds_large_frames.xml")
    return LaunchDescription([
        DeclareLaunchArgument("model_path", default_value="",
                              description="MobileVLM checkpoint directory (empty: the params file's, by default the shipped demo model)"),
        DeclareLaunchArgument("params_file", default_value=str(share / "config" / "mobilevlm.yaml"),
                              description="node parameters (YAML; key /** or the node's name)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("camera_topic", default_value="",
                              description="camera image topic remapped onto the node's `image` input (empty: no remapping)"),
        DeclareLaunchArgument("use_compressed", default_value="false",
                              description="true: the camera is sensor_msgs/CompressedImage on <camera_topic>/compressed"),
        DeclareLaunchArgument("use_sim_time", default_value="",
                              description="true when replaying a bag with --clock or in simulation (empty: the params file's, false)"),
        DeclareLaunchArgument("autostart", default_value="",
                              description="false: wait for a lifecycle manager to configure and activate (empty: the params file's, true)"),
        DeclareLaunchArgument("fastdds_profile",
                              default_value=EnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", default_value=profile),
                              description="Fast DDS XML profile of the node's process (default: an exported "
                                          "FASTDDS_DEFAULT_PROFILES_FILE, else the package's 32 MB shared-memory profile "
                                          "for large raw frames); empty: none"),
        OpaqueFunction(function=node_action),
    ])
