"""Packaging of the mobilevlm_ros ROS 2 package (ament_python) and Python library."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "mobilevlm_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="MobileVLM perception node and library: visual question answering and "
    "navigation-instruction following on camera frames.",
    license="Apache-2.0",
    maintainer="mobilevlm_ros maintainers",
    packages=find_packages(exclude=["test", "test.*"]),
    # The shipped tiny demo checkpoint (written by `mobilevlm train`).
    package_data={PACKAGE: ["demo/checkpoint/*", "demo/checkpoint/clip-vit-demo/*"]},
    data_files=[
        # Marker that registers the package in the ament resource index (how ROS tools find it).
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", sorted(glob("config/*.yaml") + glob("config/*.xml"))),
    ],
    python_requires=">=3.10",
    # Unpinned on purpose: the pins live in the repository's requirements.txt. rclpy and the message
    # packages come from ROS (or the ros-* wheels), not from this list. torch is a lower bound only,
    # so an installed build (CPU, CUDA, JetPack) satisfies it and pip never swaps it.
    install_requires=[
        "numpy",
        "pillow",
        "opencv-python-headless",
        "torch>=2.1",
        "transformers>=5",
        "safetensors",
        "sentencepiece",
        "tokenizers",
    ],
    extras_require={
        # Optional backends: `auto` uses them when they are installed.
        "llamacpp": ["llama-cpp-python", "gguf"],
        "onnx": ["onnx", "onnxruntime"],
        # An extra, not `tests_require`: setuptools >= 72 no longer knows that option and warns about it.
        "test": ["pytest"],
    },
    zip_safe=False,
    entry_points={
        "console_scripts": [
            "mobilevlm = mobilevlm_ros.cli:main",
            "mobilevlm_node = mobilevlm_ros.ros.node:main",
        ],
    },
)
