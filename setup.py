"""Builds blurfast._C with CMake and ninja (the pybind11 cmake_example pattern).

Environment:
  BLURFAST_CUDA=auto|0|1   CUDA kernels: if a compiler is found (default), never, or must.
  BLURFAST_CUDA_ARCHS      CMake CUDA architectures, e.g. "90" or "80-real;90".
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_mode():
    v = os.environ.get("BLURFAST_CUDA", "auto").strip().lower()
    modes = {"auto": "AUTO", "": "AUTO", "1": "ON", "on": "ON", "true": "ON",
             "0": "OFF", "off": "OFF", "false": "OFF"}
    if v not in modes:
        sys.exit(f"BLURFAST_CUDA: expected auto, 0 or 1, got {v!r}")
    return modes[v]


def _find_nvcc():
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        mode = _cuda_mode()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DBLURFAST_CUDA={mode}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja") or _has_ninja_module():
            args.append("-GNinja")
        if mode != "OFF":
            nvcc = _find_nvcc()
            if nvcc:
                args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            elif mode == "ON":
                sys.exit("BLURFAST_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
        if os.environ.get("BLURFAST_CUDA_ARCHS"):
            args.append(f"-DBLURFAST_CUDA_ARCHS={os.environ['BLURFAST_CUDA_ARCHS']}")
        cmake = _cmake_binary()
        subprocess.run([cmake, str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--config", "Release"], cwd=build_temp, check=True)


def _cmake_binary():
    """The cmake of the build environment (PyPI's) when installed, else the one on PATH."""
    try:
        import cmake
        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except (ImportError, AttributeError):
        return shutil.which("cmake") or "cmake"


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


setup(ext_modules=[Extension("blurfast._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
