"""Start mobilevlm_node: `ros2 launch mobilevlm_ros mobilevlm.launch.py model_path:=/opt/models/MobileVLM_V2-1.7B`.

Arguments: model_path, camera_topic (remapped onto the node's `image` input), params_file (defaults to the
package's config/mobilevlm.yaml), namespace, use_compressed (subscribe to <camera_topic>/compressed).
"""

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description() -> LaunchDescription:
    default_params = str(Path(get_package_share_directory("mobilevlm_ros")) / "config" / "mobilevlm.yaml")
    model_path = LaunchConfiguration("model_path")
    camera_topic = LaunchConfiguration("camera_topic")
    use_compressed = LaunchConfiguration("use_compressed")

    def node(transport: str, condition) -> Node:
        suffix = "/compressed" if transport == "compressed" else ""
        return Node(
            package="mobilevlm_ros",
            executable="mobilevlm_node",
            name="mobilevlm_node",
            namespace=LaunchConfiguration("namespace"),
            parameters=[LaunchConfiguration("params_file"), {"model_path": model_path, "camera_transports": [transport]}],
            remappings=[(f"image{suffix}", [camera_topic, suffix])],
            output="screen",
            emulate_tty=True,
            condition=condition,
        )

    return LaunchDescription([
        DeclareLaunchArgument("model_path", default_value="", description="MobileVLM checkpoint directory (empty: the shipped demo model)"),
        DeclareLaunchArgument("camera_topic", default_value="image", description="camera image topic (raw)"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="node parameters (YAML)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("use_compressed", default_value="false", description="subscribe to <camera_topic>/compressed"),
        node("compressed", IfCondition(use_compressed)),
        node("raw", UnlessCondition(use_compressed)),
    ])
