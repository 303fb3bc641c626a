"""What MobileVLM is: config, vision tower, projectors, checkpoint loading, preprocessing and prompt (no ROS here)."""
