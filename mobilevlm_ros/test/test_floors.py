"""The oldest versions the package says it runs on (setup.py, README "Floors"), checked where this machine can.

- Python 3.10 (Humble, JetPack 6): every source compiles with a real Python 3.10 when one is installed (pyenv's,
  or python3.10 on PATH); otherwise with Python 3.10's grammar (ast feature_version), which misses fewer things
  than nothing but is no interpreter.
- Pillow: the image tests and a question about a frame that needs a resize run in a child process with the floor
  Pillow (`make test` installs it into <venv>/floors/pillow) first on sys.path.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]
SOURCES = sorted((PACKAGE / "mobilevlm_ros").rglob("*.py")) + sorted((PACKAGE / "launch").glob("*.py")) + [PACKAGE / "setup.py"]
PILLOW_FLOOR = "9.2.0"  # the oldest Pillow with a cp311 wheel; 9.1 (Image.Resampling) is what transformers 5 needs
PILLOW_DIR = Path(os.environ.get("MOBILEVLM_PILLOW_FLOOR_DIR", Path(sys.prefix) / "floors" / "pillow"))


def python310() -> str | None:
    found = shutil.which("python3.10")
    candidates = [found] if found else []
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))
    for candidate in candidates:
        result = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip() == "(3, 10)":
            return candidate
    return None


def test_every_source_is_python_3_10():
    interpreter = python310()
    if interpreter is None:
        for source in SOURCES:
            ast.parse(source.read_text(), str(source), feature_version=(3, 10))
        pytest.skip("no Python 3.10 here: checked with Python 3.10's grammar only")
    script = "import sys\nfor path in sys.argv[1:]:\n    compile(open(path).read(), path, 'exec')\n"
    result = subprocess.run([interpreter, "-c", script, *map(str, SOURCES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def floor_environment() -> dict[str, str]:
    if not (PILLOW_DIR / "PIL").is_dir():
        pytest.skip(f"no floor Pillow in {PILLOW_DIR} (`make test` installs pillow=={PILLOW_FLOOR} there)")
    path = [str(PILLOW_DIR), str(Path(__file__).parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.environ | {"PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


def test_image_tests_pass_on_the_oldest_pillow():
    env = floor_environment()
    version = subprocess.run([sys.executable, "-c", "import PIL; print(PIL.__version__)"], env=env, capture_output=True, text=True)
    assert version.stdout.strip() == PILLOW_FLOOR, version.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-p", "no:xdist",
         str(PACKAGE / "test" / "test_preprocess.py"), str(PACKAGE / "test" / "test_tiling.py")],
        env=env, capture_output=True, text=True, cwd=PACKAGE.parent,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_a_frame_that_needs_a_resize_is_answered_the_same_on_the_oldest_pillow():
    """Issue 21: with Image.Resampling, every frame that needs a resize failed on a Pillow older than 9.1."""
    script = (
        "import numpy as np, PIL\n"
        "from mobilevlm_ros.demo import DEMO_CHECKPOINT\n"
        "from mobilevlm_ros.runtime.vlm import MobileVLM\n"
        "frame = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)\n"
        "frame[100:300, 200:400] = (220, 40, 40)\n"
        "vlm = MobileVLM.from_pretrained(DEMO_CHECKPOINT, device='cpu')\n"
        "print(PIL.__version__, '|', vlm.ask(frame, 'What colour is the square?', max_new_tokens=4))\n"
    )
    floor = subprocess.run([sys.executable, "-c", script], env=floor_environment(), capture_output=True, text=True)
    assert floor.returncode == 0, floor.stderr[-3000:]
    current = subprocess.run([sys.executable, "-c", script], env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert current.returncode == 0, current.stderr[-3000:]
    floor_version, floor_answer = floor.stdout.strip().splitlines()[-1].split(" | ")
    assert floor_version == PILLOW_FLOOR
    assert floor_answer == current.stdout.strip().splitlines()[-1].split(" | ")[1]
