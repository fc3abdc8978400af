"""Builds fineviti._C from csrc/ through CMake; package metadata lives in pyproject.toml.

Environment: MAX_JOBS (parallel compile jobs), TORCH_CUDA_ARCH_LIST (default: the visible GPU's
capability, else "9.0+PTX"), FINEVITI_SKIP_CUDA_BUILD=1 (C++ only), CUDA_HOME (the toolkit; default
/usr/local/cuda), FINEVITI_BUILD_TYPE (default Release). Nothing here reaches the network.

The CMake build directory is kept under build/cmake/, one per configuration, so that an editable
install and a wheel built from the same checkout share compiled objects.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _env_flag(variable: str) -> bool:
    """An on/off variable as fineviti._checks.env_flag reads it (setup.py cannot import the package it builds)."""
    value = os.environ.get(variable, "").strip().lower()
    if value in ("1", "true", "yes", "on", "y"):
        return True
    if value in ("", "0", "false", "no", "off", "n"):
        return False
    raise ValueError(f"{variable}={os.environ[variable]!r} is not an on/off value; expected 1, true, yes, on or 0, "
                     "false, no, off")


def _tool(name: str) -> str | None:
    # Prefer the cmake/ninja installed beside the interpreter (pip's), which need not be on PATH.
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def _cuda_arch_list(torch) -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0+PTX"


def _private_libstdcxx(library: Path) -> bool:
    """Whether `library` defines libstdc++'s stream code itself (a static copy) instead of importing it."""
    nm = shutil.which("nm")
    if nm is None:
        return False
    symbols = subprocess.run([nm, "--defined-only", str(library)], capture_output=True, text=True).stdout
    return "_ZNSo9_M_insertIlEERSoT_" in symbols  # std::ostream::_M_insert<long>


def _loaded_libstdcxx() -> str | None:
    """The libstdc++ that this Python process (torch imported) has loaded, by its path in /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in maps:
        fields = line.split()
        if len(fields) >= 6 and "libstdc++.so" in fields[-1]:
            return fields[-1]
    return None


def _cache_value(build_dir: Path, name: str) -> str:
    for line in (build_dir / "CMakeCache.txt").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split("=", 1)[1]
    return ""


class FreshBuildPy(build_py):
    """build_py that starts from an empty build/lib/fineviti: setuptools copies the package there and never prunes
    it, so a module deleted from the checkout went on shipping in every wheel built from it."""

    def run(self) -> None:
        stale = Path(self.build_lib) / "fineviti"
        if stale.is_dir() and not stale.resolve().is_relative_to(ROOT / "fineviti"):
            shutil.rmtree(stale)
        super().run()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        nvcc = _nvcc()
        skip_cuda = _env_flag("FINEVITI_SKIP_CUDA_BUILD")
        with_cuda = torch.version.cuda is not None and nvcc is not None and not skip_cuda
        build_type = os.environ.get("FINEVITI_BUILD_TYPE", "Debug" if self.debug else "Release")
        env = dict(os.environ)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DFINEVITI_BUILD_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if torch.version.cuda is not None and nvcc is not None:
            # torch's CMake config enables CUDA for a CUDA build of torch even when we skip our .cu files.
            env["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list(torch)
            toolkit = Path(nvcc).resolve().parent.parent
            # CUDA_TOOLKIT_ROOT_DIR: torch's config still runs the old FindCUDA, which would otherwise take
            # the first nvcc on PATH (possibly a wrapper script outside the toolkit).
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCUDAToolkit_ROOT={toolkit}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={toolkit}",
            ]
        elif torch.version.cuda is not None:
            # torch's CMake config refuses to load without a CUDA toolkit, even for a C++-only build: find torch's
            # headers and libraries by path instead (as torch.utils.cpp_extension.CppExtension does).
            print(f"fineviti: torch {torch.__version__} is a CUDA build and no nvcc was found in $CUDA_HOME/bin, "
                  "/usr/local/cuda/bin or on PATH: building the C++ sources only (the Triton kernels need no nvcc)",
                  flush=True)
            args.append("-DFINEVITI_TORCH_WITHOUT_CONFIG=ON")
        cmake, ninja = _tool("cmake"), _tool("ninja")
        if cmake is None:
            raise RuntimeError(
                "building fineviti._C needs CMake >= 3.22: `pip install cmake` or install it system-wide"
            )
        if ninja:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        if os.environ.get("FINEVITI_LIBSTDCXX"):
            args.append(f"-DFINEVITI_LIBSTDCXX={os.environ['FINEVITI_LIBSTDCXX']}")
        built = self._cmake(cmake, args, env, torch)
        if _private_libstdcxx(built):
            # A C++ compiler that links its own libstdc++ statically (the GPU machines' $CXX does) gives the
            # extension a second copy of the C++ runtime beside torch's: number formatting in error messages
            # then breaks or crashes the process. The system compiler links the shared one.
            # The fix: link the shared libstdc++ this process has loaded (torch's) by its path, ahead of what the
            # compiler driver appends, so that no archive member of a static copy is pulled in; and prefer the
            # system compiler. Seen on the GPU machines: /usr/bin/c++ alone still linked a private copy.
            compiler = _cache_value(built.parent, "CMAKE_CXX_COMPILER")
            system = shutil.which("c++", path="/usr/bin")
            shared = _loaded_libstdcxx()
            retry = list(args)
            if system is not None and Path(system).resolve() != Path(compiler).resolve():
                retry.append(f"-DCMAKE_CXX_COMPILER={system}")
            if os.environ.get("FINEVITI_LIBSTDCXX"):  # the user's choice stands (already in args)
                shared = os.environ["FINEVITI_LIBSTDCXX"]
            elif shared is not None:
                retry.append(f"-DFINEVITI_LIBSTDCXX={shared}")
            print(f"fineviti: {compiler} linked a private copy of libstdc++ into {built.name}; rebuilding with "
                  f"{system or compiler} and {shared or 'no loaded libstdc++ found'}", flush=True)
            built = self._cmake(cmake, retry, env, torch)
            if _private_libstdcxx(built) and not _env_flag("FINEVITI_ALLOW_PRIVATE_LIBSTDCXX"):
                raise RuntimeError(
                    f"fineviti._C still links a private copy of libstdc++ after a rebuild with {system or compiler} "
                    f"and {shared or 'no loaded libstdc++'}: C++ error messages with numbers may crash the process. "
                    "Build with a compiler that links the shared libstdc++ (CXX=...), or set "
                    "FINEVITI_ALLOW_PRIVATE_LIBSTDCXX=1 to install it anyway"
                )

        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)

    def _cmake(self, cmake: str, args: list[str], env: dict, torch) -> Path:
        # One build dir per environment and configuration; `python` and `python3` of one venv share it.
        key = (
            sys.prefix,
            sys.version,
            torch.__version__,
            torch.__file__,
            args[1:],
            env.get("TORCH_CUDA_ARCH_LIST"),
            env.get("CXX"),
        )
        build_dir = ROOT / "build" / "cmake" / hashlib.sha1(repr(key).encode()).hexdigest()[:12]
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(
            f"fineviti: CUDA sources {'on' if '-DFINEVITI_BUILD_CUDA=ON' in args else 'off'}, TORCH_CUDA_ARCH_LIST="
            f"{env.get('TORCH_CUDA_ARCH_LIST', '')}, {jobs} jobs, build dir {build_dir}",
            flush=True,
        )
        # Builds sharing a dir (an editable install and the wheel test, say) take turns: ninja's logs do not
        # survive two writers.
        with open(build_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
            subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True, env=env)
        return next(build_dir.glob("_C.*.so"))


setup(ext_modules=[CMakeExtension("fineviti._C")], cmdclass={"build_ext": CMakeBuild, "build_py": FreshBuildPy})
