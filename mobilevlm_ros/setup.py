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
    # Lower bounds only, each the oldest release the code works with (the pins live in the repository's
    # requirements.txt). rclpy and the message packages come from ROS (or the ros-* wheels), not from this list.
    # torch is a lower bound only, so an installed build (CPU, CUDA, JetPack) satisfies it and pip never swaps it.
    install_requires=[
        "numpy>=1.21",  # Humble's / JetPack 6's python3-numpy; nothing newer is used
        # 9.1 adds Image.Resampling, which transformers 5 imports whenever Pillow is installed: Ubuntu 22.04's
        # python3-pil 9.0.1 cannot load transformers 5 at all. test_floors.py runs the image tests on 9.2.0, the
        # oldest with a Python 3.11 wheel (the library's own code keeps to what 9.0.1 also has).
        "pillow>=9.1",
        "opencv-python-headless",
        # transformers disables (refuses to use) older torch: 5.14 needs torch >= 2.4, later releases raise it (2.5,
        # then 2.6 from 5.20; each release's own check). JetPack 6's torch therefore limits transformers there
        # (README "Floors"); the pins tested here are torch 2.13 and transformers 5.23.
        "torch>=2.4",
        # 5.14: the oldest release test_session.py and test_torch_backend.py pass with (5.13.1 fails the cached-prefix
        # equalities; CLIPVisionModel lost its `vision_model` level in 5.6; StaticLayer.cumulative_length is from 5.4)
        "transformers>=5.14",
        "safetensors",
        "sentencepiece",
        "tokenizers",
    ],
    extras_require={
        # Optional backends: `auto` uses them when they are installed.
        "llamacpp": ["llama-cpp-python", "gguf"],
        "onnx": ["onnx>=1.12", "onnxruntime"],  # onnx 1.12: opset 17 (LayerNormalization)
        "bench": ["matplotlib>=3.6"],  # `mobilevlm bench --plot` (3.6: the layout="constrained" keyword)
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
