#!/usr/bin/env python3
"""Point the ROS 2 wheels' CMake exports at this venv's Python and numpy headers.

Why: the ROS 2 PyPI wheels were built in a manylinux container and their exported CMake
files (``<venv>/share/<pkg>/cmake/*.cmake``) still carry that container's absolute paths,
e.g. ``/opt/python/cp311-cp311/include/python3.11`` and
``/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include``.
A package that runs ``rosidl_generate_interfaces`` against those exports fails to configure
because the directories don't exist here. This script rewrites them to the include dirs of
the venv's own interpreter. It is idempotent: once rewritten, nothing matches any more.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

LOG = logging.getLogger("fix_ros_wheel_cmake")

# The wheel build container's interpreter prefix, e.g. /opt/python/cp311-cp311 (or cp313-cp313t).
_CONTAINER_PREFIX = r"/opt/python/cp\d+-cp\d+t?"
_PYTHON_INCLUDE = re.compile(_CONTAINER_PREFIX + r"/include/python3\.\d+t?")
_NUMPY_INCLUDE = re.compile(
    _CONTAINER_PREFIX + r"/lib/python3\.\d+t?/site-packages/numpy/_core/include"
)
_ANY_CONTAINER_PATH = re.compile(_CONTAINER_PREFIX + r"/")

# Asked of the venv's interpreter, not of whoever runs this script: the paths must be its own.
_QUERY = (
    "import json, sysconfig, numpy; "
    "print(json.dumps({'python': sysconfig.get_paths()['include'], 'numpy': numpy.get_include()}))"
)


def venv_include_dirs(venv: Path) -> tuple[str, str]:
    """Return (Python include dir, numpy include dir) of the venv's interpreter."""
    python = venv / "bin" / "python"
    out = subprocess.run([str(python), "-c", _QUERY], check=True, capture_output=True, text=True)
    paths = json.loads(out.stdout)
    for name, path in paths.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{name} include dir {path} of {python} does not exist")
    return paths["python"], paths["numpy"]


def fix_file(path: Path, python_include: str, numpy_include: str) -> bool:
    """Rewrite one CMake file in place; return True when it changed."""
    text = path.read_text(encoding="utf-8")
    # Numpy first: its path is longer and must not be split by the Python include pattern.
    new = _NUMPY_INCLUDE.sub(numpy_include, text)
    new = _PYTHON_INCLUDE.sub(python_include, new)
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def fix_venv(venv: Path) -> int:
    """Rewrite every CMake file of the venv's ROS packages; return how many changed."""
    share = venv / "share"
    if not share.is_dir():
        raise FileNotFoundError(f"{share} not found: are the ROS 2 wheels installed in {venv}?")
    python_include, numpy_include = venv_include_dirs(venv)
    changed = 0
    for path in sorted(share.glob("*/cmake/*.cmake")):
        if fix_file(path, python_include, numpy_include):
            LOG.info("rewrote %s", path.relative_to(venv))
            changed += 1
        elif _ANY_CONTAINER_PATH.search(path.read_text(encoding="utf-8")):
            LOG.warning("%s still names a wheel-container path this script does not know", path)
    LOG.info("%d CMake file(s) rewritten (python: %s, numpy: %s)", changed, python_include, numpy_include)
    return changed



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path, help="the virtual environment the ROS 2 wheels are installed in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    fix_venv(args.venv.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
