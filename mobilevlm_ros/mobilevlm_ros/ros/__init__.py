"""The ROS 2 node: topic, service and action interfaces around the MobileVLM runtime, and camera-image conversion."""
