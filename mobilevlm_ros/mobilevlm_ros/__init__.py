"""mobilevlm_ros: MobileVLM on the edge, as a Python library (`model`, `runtime`) and a ROS 2 node (`ros`)."""
