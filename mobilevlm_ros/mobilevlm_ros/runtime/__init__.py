"""How MobileVLM runs: generation, sampling and the `MobileVLM` front door (no ROS here)."""
