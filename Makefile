# Setup, build and test of the repository, with nothing but python3, cmake and a C/C++ compiler
# on the machine: ROS 2 comes from PyPI wheels into .venv/, the interfaces are built against them.
# Stamps live inside the venv so that deleting the venv also forgets what was built into it.
#
# Two venvs: .venv (ROS 2 Kilted's rclpy, the full suite) and .venv-jazzy (ROS 2 Jazzy's rclpy, the ROS-facing
# tests). The rules below serve either: `make test-jazzy` runs them again with VENV and REQUIREMENTS changed.

VENV         ?= .venv
REQUIREMENTS ?= requirements.txt
PY           := $(VENV)/bin/python
PIP          := $(PY) -m pip
VENV_ABS     := $(abspath $(VENV))
BUILD_ROOT   := build/$(notdir $(VENV))
PYTEST_ARGS  ?=

# The launch tests run mobilevlm.launch.py through the real launch of Humble and Jazzy, whose sources (and the
# composition_interfaces package launch_ros imports) are in ../shared/ros2-launch; without them they skip.
MOBILEVLM_ROS2_LAUNCH ?= $(abspath $(wildcard ../shared/ros2-launch))
export MOBILEVLM_ROS2_LAUNCH

VENV_STAMP       := $(VENV)/.requirements.stamp
INTERFACES_STAMP := $(VENV)/.interfaces.stamp
INSTALL_STAMP    := $(VENV)/.install.stamp
LAUNCH_STAMP     := $(if $(MOBILEVLM_ROS2_LAUNCH),$(VENV)/.composition_interfaces.stamp)

INTERFACE_SRCS := mobilevlm_interfaces/CMakeLists.txt mobilevlm_interfaces/package.xml \
	$(wildcard mobilevlm_interfaces/msg/*.msg mobilevlm_interfaces/srv/*.srv mobilevlm_interfaces/action/*.action)
# What scripts/install_ros_layout.py lays out from setup.py's data_files.
ROS_LAYOUT_SRCS := mobilevlm_ros/resource/mobilevlm_ros $(wildcard mobilevlm_ros/launch/* mobilevlm_ros/config/*)

.PHONY: venv interfaces launch-interfaces install lint test test-kilted test-jazzy demo clean distclean

venv: $(VENV_STAMP)
interfaces: $(INTERFACES_STAMP)
launch-interfaces: $(LAUNCH_STAMP)
install: $(INSTALL_STAMP)

# requirements.txt holds every pin. Another REQUIREMENTS file (requirements-jazzy.txt) names its own ROS packages
# and takes every other pin from requirements.txt, given as constraints less its ros-* lines.
$(VENV_STAMP): $(REQUIREMENTS) requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	grep -v '^ros-' requirements.txt > $(VENV)/constraints.txt
	$(PIP) install --no-input -r $(REQUIREMENTS) -c $(VENV)/constraints.txt
	touch $@

# The wheels' CMake files name their build container's include dirs: rewrite them first.
# Installing into the venv prefix makes `import mobilevlm_interfaces` work with no extra env.
$(INTERFACES_STAMP): $(VENV_STAMP) $(INTERFACE_SRCS) scripts/fix_ros_wheel_cmake.py
	$(PY) scripts/fix_ros_wheel_cmake.py $(VENV)
	$(call build_rosidl_package,mobilevlm_interfaces)
	touch $@

# launch_ros imports composition_interfaces (not on PyPI): built the same way, from ../shared/ros2-launch.
$(VENV)/.composition_interfaces.stamp: $(VENV_STAMP) scripts/fix_ros_wheel_cmake.py
	$(PY) scripts/fix_ros_wheel_cmake.py $(VENV)
	$(call build_rosidl_package,$(MOBILEVLM_ROS2_LAUNCH)/composition_interfaces)
	touch $@

# A rosidl (ament_cmake) package configured against the venv's ROS wheels, built and installed into the venv.
define build_rosidl_package
	CMAKE_PREFIX_PATH=$(VENV_ABS) AMENT_PREFIX_PATH=$(VENV_ABS) cmake -S $(1) -B $(BUILD_ROOT)/$(notdir $(1)) \
		-G Ninja -DCMAKE_MAKE_PROGRAM=$(VENV_ABS)/bin/ninja \
		-DCMAKE_INSTALL_PREFIX=$(VENV_ABS) -DPython3_EXECUTABLE=$(VENV_ABS)/bin/python -DBUILD_TESTING=OFF
	cmake --build $(BUILD_ROOT)/$(notdir $(1))
	cmake --install $(BUILD_ROOT)/$(notdir $(1))
endef

# --no-deps: requirements.txt already installed the pinned dependencies (pip check proves it), so pip
# can never swap torch. --no-build-isolation: build with the venv's pinned setuptools, no download.
# editable_mode=compat: a path entry instead of an import hook, so `import mobilevlm_ros` still finds
# the real package when the repository root (which holds the mobilevlm_ros/ ROS package folder) is
# on sys.path, as with `python -m pytest`. Console scripts land in .venv/bin: pip ignores setup.cfg's
# ROS script_dir, which only colcon's `setup.py develop/install` uses: so install_ros_layout.py then lays out
# what colcon installs from the same setup.py (share/mobilevlm_ros, the ament index marker, lib/mobilevlm_ros/
# executables), as symbolic links into the work tree like `colcon build --symlink-install`; ROS tools (launch_ros'
# Node, FindPackageShare) find the package with AMENT_PREFIX_PATH=<venv>, as on a robot after `source install/setup.bash`.
$(INSTALL_STAMP): $(VENV_STAMP) mobilevlm_ros/setup.py mobilevlm_ros/setup.cfg mobilevlm_ros/package.xml \
		scripts/install_ros_layout.py $(ROS_LAYOUT_SRCS)
	$(PIP) install --no-input --no-deps --no-build-isolation --config-settings editable_mode=compat -e mobilevlm_ros
	$(PIP) check
	$(PY) scripts/install_ros_layout.py mobilevlm_ros $(VENV)
	touch $@

# ruff over the repository (settings in pyproject.toml); `make test` lints first.
lint: venv
	$(PY) -m ruff check .

# The full suite on Kilted's rclpy, then the ROS-facing tests on Jazzy's.
test: test-kilted test-jazzy

test-kilted: lint venv interfaces launch-interfaces install floors
	$(PY) -m pytest mobilevlm_ros/test $(PYTEST_ARGS)

# The oldest Pillow the package allows (setup.py), beside the venv's own: test_floors.py runs the image tests on it.
.PHONY: floors
floors: $(VENV)/floors/.pillow.stamp
$(VENV)/floors/.pillow.stamp: $(VENV_STAMP)
	rm -rf $(VENV)/floors/pillow
	$(PIP) install --no-input --no-deps --only-binary=:all: --target $(VENV)/floors/pillow pillow==9.2.0
	touch $@

# Jazzy's rclpy family and what the ROS-facing tests import (no llama.cpp: requirements-jazzy.txt says why), the
# interfaces built against it: the node, interfaces, launch (Jazzy's launch only) and reliability's node tests.
JAZZY_TESTS := test_interfaces.py test_node.py test_node_modes.py test_node_lifecycle.py test_node_cameras.py test_launch.py \
	test_reliability.py
test-jazzy:
	$(MAKE) --no-print-directory VENV=.venv-jazzy REQUIREMENTS=requirements-jazzy.txt venv interfaces launch-interfaces install
	MOBILEVLM_LAUNCH_DISTROS=jazzy .venv-jazzy/bin/python -m pytest $(addprefix mobilevlm_ros/test/,$(JAZZY_TESTS)) \
		-k "not gguf" $(PYTEST_ARGS)

# Only the reliability tests (fuzzing every input with the large hypothesis profile, overload, soak, faults, signals,
# security); their figures are printed at the end and written to mobilevlm-figures.json in $TMPDIR (/tmp).
.PHONY: reliability
reliability: venv interfaces install
	$(PY) -m pytest mobilevlm_ros/test -m reliability --hypothesis-profile=reliability $(PYTEST_ARGS)

# The node on the shipped demo model, a synthetic camera and a client asking through the real services.
demo: venv interfaces install
	$(PY) -m mobilevlm_ros.demo.ros_demo --out mobilevlm_demo

clean:
	rm -rf build
	rm -f .venv*/.*.stamp .venv*/floors/.*.stamp

distclean: clean
	rm -rf .venv .venv-jazzy
