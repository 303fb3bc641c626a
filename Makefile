# Setup, build and test of the repository, with nothing but python3, cmake and a C/C++ compiler
# on the machine: ROS 2 comes from PyPI wheels into .venv/, the interfaces are built against them.
# Stamps live inside .venv/ so that deleting the venv also forgets what was built into it.

VENV       := .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
VENV_ABS   := $(abspath $(VENV))
BUILD_DIR  := build/mobilevlm_interfaces
PYTEST_ARGS ?=

VENV_STAMP       := $(VENV)/.requirements.stamp
INTERFACES_STAMP := $(VENV)/.interfaces.stamp
INSTALL_STAMP    := $(VENV)/.install.stamp

INTERFACE_SRCS := mobilevlm_interfaces/CMakeLists.txt mobilevlm_interfaces/package.xml \
	$(wildcard mobilevlm_interfaces/msg/*.msg mobilevlm_interfaces/srv/*.srv mobilevlm_interfaces/action/*.action)

.PHONY: venv interfaces install test demo clean distclean

venv: $(VENV_STAMP)
interfaces: $(INTERFACES_STAMP)
install: $(INSTALL_STAMP)

$(VENV_STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --no-input -r requirements.txt
	touch $@

# The wheels' CMake files name their build container's include dirs: rewrite them first.
# Installing into the venv prefix makes `import mobilevlm_interfaces` work with no extra env.
$(INTERFACES_STAMP): $(VENV_STAMP) $(INTERFACE_SRCS) scripts/fix_ros_wheel_cmake.py
	$(PY) scripts/fix_ros_wheel_cmake.py $(VENV)
	CMAKE_PREFIX_PATH=$(VENV_ABS) AMENT_PREFIX_PATH=$(VENV_ABS) cmake -S mobilevlm_interfaces -B $(BUILD_DIR) \
		-G Ninja -DCMAKE_MAKE_PROGRAM=$(VENV_ABS)/bin/ninja \
		-DCMAKE_INSTALL_PREFIX=$(VENV_ABS) -DPython3_EXECUTABLE=$(VENV_ABS)/bin/python -DBUILD_TESTING=OFF
	cmake --build $(BUILD_DIR)
	cmake --install $(BUILD_DIR)
	touch $@

# --no-deps: requirements.txt already installed the pinned dependencies (pip check proves it), so pip
# can never swap torch. --no-build-isolation: build with the venv's pinned setuptools, no download.
# editable_mode=compat: a path entry instead of an import hook, so `import mobilevlm_ros` still finds
# the real package when the repository root (which holds the mobilevlm_ros/ ROS package folder) is
# on sys.path, as with `python -m pytest`. Console scripts land in .venv/bin: pip ignores setup.cfg's
# ROS script_dir, which only colcon's `setup.py develop/install` uses.
$(INSTALL_STAMP): $(VENV_STAMP) mobilevlm_ros/setup.py mobilevlm_ros/setup.cfg mobilevlm_ros/package.xml
	$(PIP) install --no-input --no-deps --no-build-isolation --config-settings editable_mode=compat -e mobilevlm_ros
	$(PIP) check
	touch $@

test: venv interfaces install
	$(PY) -m pytest mobilevlm_ros/test $(PYTEST_ARGS)

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
	rm -f $(VENV_STAMP) $(INTERFACES_STAMP) $(INSTALL_STAMP)

distclean: clean
	rm -rf $(VENV)
