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
    # Floors (README "Floors": how each is checked). Python 3.10: Humble / JetPack 6 (test_floors.py compiles every
    # source with a Python 3.10 where one is installed).
    python_requires=">=3.10",
    # Unpinned on purpose: the pins live in the repository's requirements.txt. rclpy and the message
    # packages come from ROS (or the ros-* wheels), not from this list. torch is a lower bound only,
    # so an installed build (CPU, CUDA, JetPack) satisfies it and pip never swaps it.
    install_requires=[
        "numpy",
        # 9.1 adds Image.Resampling, which transformers 5 imports whenever Pillow is installed: Ubuntu 22.04's
        # python3-pil 9.0.1 cannot load transformers 5 at all. test_floors.py runs the image tests on 9.2.0, the
        # oldest with a Python 3.11 wheel (the library's own code keeps to what 9.0.1 also has).
        "pillow>=9.1",
        "opencv-python-headless",
        # transformers 5 disables (refuses to use) older torch: 5.0 needs torch >= 2.2, 5.1-5.15 >= 2.4,
        # 5.16-5.19 >= 2.5, 5.20 and later >= 2.6 (each release's own check). JetPack 6's torch 2.3-2.5 therefore
        # limits transformers there (README "Floors"); the pins tested here are torch 2.13 and transformers 5.23.
        "torch>=2.2",
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
