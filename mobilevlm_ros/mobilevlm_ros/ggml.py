"""llama.cpp's process-wide state: its log routed to Python logging, its backends initialised once, and the extra CPU
buffer types offered to the models it loads (AMX left out where its matmul crashes).

ggml, the tensor library under llama.cpp, keeps all of this per process, not per model. Its two users here share it
from this module: the llama.cpp language backend (runtime/llamacpp.py) and the GGUF quantizer (export/gguf.py), which
must not import each other (export does not import runtime). The bench's llama-cpp-python baseline loads its model
through `model_load` too, so both pipelines get the same buffer types.
"""

import ctypes
import logging
import re
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import llama_cpp
import llama_cpp._ggml

from mobilevlm_ros.cpu import cpu_info

llama_logger = logging.getLogger(__name__ + ".native")

# ggml_log_level in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous
# message). llama-cpp-python's own _logger.py still assumes an older order, which is one reason not to use it.
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_log_state: dict = {"pending": "", "level": logging.DEBUG, "capture": None}
_init_lock = threading.Lock()
_initialized = False
_mtmd_initialized = False
_load_lock = threading.Lock()  # a model loads with the CPU buffer types chosen for it, not another thread's
_MODEL_BUFFER = re.compile(r"^\S+:\s+(\S+) model buffer size =\s+([\d.]+) MiB")

# ggml's name of its AMX weight buffer type (ggml-cpu/amx). With it, llama.cpp's matmuls on AMX CPUs run
# ggml_backend_amx_mul_mat, which crashes on some of them (llama-cpp-python 0.3.36; no upstream fix).
AMX_BUFFER_TYPE = "AMX"


@llama_cpp.llama_log_callback
def _route_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's messages arrive in pieces; log whole lines to `llama_logger` (INFO chatter at DEBUG), never stdout."""
    if level != 5:
        _log_state["level"] = _LOG_LEVELS.get(level, logging.DEBUG)
    pending = _log_state["pending"] + text.decode("utf-8", errors="replace")
    *lines, _log_state["pending"] = pending.split("\n")
    for line in lines:
        if line.strip():
            llama_logger.log(_log_state["level"], "%s", line.rstrip())
            if _log_state["capture"] is not None:
                _log_state["capture"].append(line)


def init_llama_cpp() -> None:
    """Route llama.cpp's logging to Python logging and initialise its backends (once per process)."""
    global _initialized
    with _init_lock:
        if not _initialized:
            llama_cpp.llama_log_set(_route_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _initialized = True


def init_mtmd() -> None:
    """`init_llama_cpp`, and the log of libmtmd (llama.cpp's image encoder: clip and mtmd, and mtmd's helpers, which
    the bench's llama.cpp mtmd pipeline calls), which has hooks of its own, routed the same way (once per process)."""
    global _mtmd_initialized
    init_llama_cpp()
    with _init_lock:
        if not _mtmd_initialized:
            from llama_cpp import mtmd_cpp  # loads libmtmd: only for the ggml vision backend

            # The helpers' hook (mtmd-helper.cpp); setting it sets clip's and mtmd's too (mtmd_log_set).
            mtmd_cpp.mtmd_helper_log_set(_route_log, ctypes.c_void_p(0))
            _mtmd_initialized = True


# ggml_backend_dev_type (ggml-backend.h): CPU 0, GPU 1, IGPU 2 (an integrated GPU using host memory), ACCEL 3.
_GPU_DEVICE_TYPES = (1, 2)


def gpu_devices() -> list[str]:
    """llama.cpp's GPU devices ("CUDA0 (Orin)", ...): empty for a CPU-only build, where `n_gpu_layers` is ignored."""
    init_llama_cpp()
    ggml = llama_cpp._ggml.libggml
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(ggml, name).restype = ctypes.c_char_p
        getattr(ggml, name).argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    devices = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
    return [f"{ggml.ggml_backend_dev_name(device).decode()} ({ggml.ggml_backend_dev_description(device).decode()})"
            for device in devices if ggml.ggml_backend_dev_type(device) in _GPU_DEVICE_TYPES]


def amx_allowed(cpu_flags: Collection[str], amx: bool | None = None) -> bool:
    """Whether llama.cpp may keep weights in its AMX buffer type. `amx=None` decides by the CPU's features: not on a
    CPU with AMX, where that path crashes; elsewhere the buffer type does not exist, so allowing it changes nothing.
    `amx=True` is for llama.cpp builds where AMX works."""
    return amx if amx is not None else "amx_int8" not in cpu_flags


class _ExtraBufferTypes:
    """llama.cpp's extra CPU buffer types: weight layouts for faster kernels (CPU_REPACK, AMX, ...), offered by ggml's
    CPU backend as a NULL-terminated array that llama.cpp reads at every model load (llama_model_params has only
    `use_extra_bufts`, all or none). Keeping CPU_REPACK while leaving AMX out means editing that array in place;
    the full list is remembered, so a later selection can put entries back. Process-wide, like ggml's backends."""

    def __init__(self) -> None:
        ggml = llama_cpp._ggml.libggml
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        ggml.ggml_backend_buft_name.restype = ctypes.c_char_p
        ggml.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
        cpu = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        address = ggml.ggml_backend_reg_get_proc_address(ggml.ggml_backend_dev_backend_reg(cpu), b"ggml_backend_dev_get_extra_bufts")
        self._array = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(cpu) if address else None
        self.all: list[tuple[str, int]] = []  # (name, buffer type) in llama.cpp's order of preference
        while self._array and self._array[len(self.all)]:
            buffer_type = self._array[len(self.all)]
            self.all.append((ggml.ggml_backend_buft_name(buffer_type).decode(), buffer_type))
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.all]

    def offer(self, names: Collection[str]) -> None:
        """Offer the models loaded from now on only the extra buffer types in `names` (in llama.cpp's order)."""
        kept = [buffer_type for name, buffer_type in self.all if name in names]
        with self._lock:
            for i in range(len(self.all)):
                self._array[i] = kept[i] if i < len(kept) else None


_extra_buffer_types: _ExtraBufferTypes | None = None


def extra_buffer_types() -> _ExtraBufferTypes:
    global _extra_buffer_types
    init_llama_cpp()
    with _init_lock:
        if _extra_buffer_types is None:
            _extra_buffer_types = _ExtraBufferTypes()
    return _extra_buffer_types


def offered_buffer_types(amx: bool | None = None) -> list[str]:
    """The extra CPU buffer types llama.cpp may put weights in under the `amx` setting (see `amx_allowed`)."""
    allowed = amx_allowed(cpu_info().flags, amx)
    return [name for name in extra_buffer_types().names if allowed or name != AMX_BUFFER_TYPE]


@contextmanager
def model_load(amx: bool | None = None) -> Iterator[dict[str, float]]:
    """Around loading a llama.cpp model (ours or llama-cpp-python's `Llama`): offer it the extra CPU buffer types that
    `amx_allowed` permits, and fill the yielded dict with where the weights went, in MiB per buffer type
    (CPU_REPACK, AMX, CPU, CUDA0, ...) as llama.cpp reports them."""
    buffers: dict[str, float] = {}
    with _load_lock:
        extra_buffer_types().offer(offered_buffer_types(amx))
        _log_state["capture"] = lines = []
        try:
            yield buffers
        finally:
            _log_state["capture"] = None
    buffers |= {match[1]: float(match[2]) for line in lines if (match := _MODEL_BUFFER.match(line))}
