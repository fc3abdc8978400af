"""The package: fineviti.kernels imports from the repository root and from an installed wheel, and the
wheel holds the Triton sources once, as fineviti/kernels, never as a top-level `kernels` package.

The wheel is built once per session with pip, like a user would (`pip wheel --no-build-isolation`), and
reuses setup.py's CMake build directory of the editable build, so it costs seconds after scripts/setup.sh.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, **env) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert done.returncode == 0, f"python -c {code!r} failed in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_kernels_import_from_the_repository_root():
    out = run_python("import fineviti.kernels as k, fineviti as f; print(f.__file__); print(k.__file__)", cwd=ROOT)
    package, kernels = (Path(line) for line in out.split())
    assert package == ROOT / "fineviti" / "__init__.py"
    assert kernels.resolve() == ROOT / "kernels" / "__init__.py"


def test_kernels_import_without_the_extension():
    code = (
        "import sys; sys.modules['fineviti._C'] = None\n"  # any import of the extension now fails
        "import fineviti.kernels, fineviti._ext as e\n"
        "assert not e.loaded() and e.load_error() is not None\n"
        "assert isinstance(fineviti.kernels.registry.declared(), dict)\n"
    )
    run_python(code, cwd=ROOT)


def test_extension_uses_the_shared_libstdcxx():
    # A private static copy of libstdc++ beside torch's shared one breaks number formatting in error messages
    # (truncated here, a crash on the H100 machine); setup.py rebuilds with the system compiler when it sees one.
    import fineviti._C

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    symbols = subprocess.run([nm, "--defined-only", fineviti._C.__file__], capture_output=True, text=True).stdout
    assert "_ZNSo9_M_insertIlEERSoT_" not in symbols, f"{fineviti._C.__file__} holds its own copy of libstdc++"


def test_the_cuda_part_is_built_wherever_it_can_be():
    """A CUDA build of torch with nvcc at hand builds the .cu sources too; only a GPU test looked, so a build that
    dropped them (a toolkit not found, a flag misread) passed CI here."""
    import torch

    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = Path(cuda_home, "bin", "nvcc").exists() or shutil.which("nvcc") is not None
    from fineviti._checks import env_flag

    if torch.version.cuda is None or not nvcc or env_flag("FINEVITI_SKIP_CUDA_BUILD"):
        pytest.skip("no CUDA torch, no nvcc, or FINEVITI_SKIP_CUDA_BUILD: a C++-only build is expected")
    import fineviti._ext

    fineviti._ext.load()
    assert torch.ops.fineviti.cuda_built(), "nvcc and a CUDA torch are here, but fineviti._C has no CUDA part"


def test_the_version_is_written_once():
    """pyproject.toml takes the version from fineviti.__version__ (it wrote 0.1.0 a second time), and setuptools reads
    it from the source without importing the package (which would import torch at build time)."""
    import tomllib

    import fineviti

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fineviti.__version__"}
    code = (
        "import sys\n"
        "sys.modules['torch'] = sys.modules['fineviti'] = None  # an import of either fails\n"
        "from setuptools.config.pyprojecttoml import read_configuration\n"
        "print(read_configuration('pyproject.toml')['project']['version'])\n"
    )
    assert run_python(code, cwd=ROOT).strip() == fineviti.__version__


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-build-isolation",
        "--no-deps",
        "--quiet",
        "-w",
        str(out),
        str(ROOT),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    (path,) = out.glob("fineviti-*.whl")
    return path


def _package_sources() -> list[str]:
    """The .py files the wheel should hold, as it names them: fineviti/** and kernels/* (as fineviti/kernels/)."""
    own = [p.relative_to(ROOT).as_posix() for p in (ROOT / "fineviti").rglob("*.py") if "__pycache__" not in p.parts
           and not p.relative_to(ROOT / "fineviti").parts[0] == "kernels"]
    return sorted(own + [f"fineviti/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")])


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")], "the wheel must not install a top-level kernels"
    shipped = sorted(n for n in names if n.startswith("fineviti/kernels/"))
    assert len(shipped) == len(set(shipped))
    # every module of the checkout, and nothing else: setuptools' build/lib kept modules deleted since the last
    # build (setup.py's FreshBuildPy empties it)
    assert sorted(n for n in names if n.endswith(".py")) == _package_sources()
    assert any(n.startswith("fineviti/_C.") and n.endswith(".so") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fineviti = fineviti.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    import fineviti

    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"\nVersion: {fineviti.__version__}\n" in metadata  # pyproject.toml takes it from fineviti.__version__
    assert wheel.name.startswith(f"fineviti-{fineviti.__version__}-")


def test_installed_wheel_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "--quiet",
        "--target",
        str(site),
        str(wheel),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (site / "kernels").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import fineviti, fineviti.kernels, torch\n"
        "cu, pos = torch.ops.fineviti.build_positions(torch.tensor([[2, 4]], dtype=torch.int32), 2)\n"
        "assert cu.tolist() == [0, 8] and pos[:, 1].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]\n"
        "print(fineviti.__file__); print(fineviti.kernels.__file__)\n"
    )
    out = run_python(code, cwd=elsewhere, PYTHONPATH=str(site))
    for line in out.split():
        assert Path(line).is_relative_to(site), f"{line} was imported from outside the installed wheel"


def test_a_module_deleted_from_the_checkout_leaves_the_next_wheel(tmp_path):
    """Build the Python part (what a wheel packs) from a copy of the checkout with one extra module, delete the
    module, build again: it must be gone from build/lib."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT, copy, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv*", "build", "runs", ".git", "*.so", "__pycache__", ".pytest_cache", "*.egg-info", "benchmarks", "tests"))
    (copy / "fineviti" / "zz_gone.py").write_text("x = 1\n")

    def build() -> list[str]:
        cmd = [sys.executable, "setup.py", "-q", "build_py"]
        done = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return sorted(p.name for p in (copy / "build").glob("lib*/fineviti/*.py"))

    assert "zz_gone.py" in build()
    (copy / "fineviti" / "zz_gone.py").unlink()
    assert "zz_gone.py" not in build()


def test_source_archive_holds_what_the_build_needs(tmp_path):
    """The sdist had no CMakeLists.txt nor csrc/: `pip install fineviti-*.tar.gz` failed in CMake."""
    import tarfile

    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (archive,) = tmp_path.glob("fineviti-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {"CMakeLists.txt", "constraints.txt", "setup.py", "pyproject.toml"}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir() if p.is_file()}
    assert needed <= names, f"missing from the source archive: {sorted(needed - names)}"


@pytest.mark.slow
def test_cxx_only_build_of_a_cuda_torch_without_nvcc(tmp_path):
    """A CUDA build of torch with no CUDA toolkit (pip's torch on a machine without nvcc) still builds the C++ ops:
    torch's CMake config refuses to load there, so setup.py finds torch by path (it used to stop with an error).
    Compiles csrc/*.cpp once (about a minute on 2 cores; its CMake build dir is kept under build/cmake/)."""
    import torch

    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build: its CMake config loads without a toolkit")
    bare_path = "/usr/bin:/bin"
    if shutil.which("nvcc", path=bare_path):
        pytest.skip(f"nvcc is in {bare_path}: no way to hide it from setup.py here")
    lib = tmp_path / "lib"
    env = {**os.environ, "PATH": bare_path, "CUDA_HOME": str(tmp_path / "no-toolkit"), "CUDA_PATH": ""}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp",
                           str(tmp_path / "temp")], cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, f"setup.py build_ext failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "building the C++ sources only" in done.stdout
    # The package as it is here, with this extension in place of the editable build's.
    package = tmp_path / "site" / "fineviti"
    shutil.copytree(ROOT / "fineviti", package, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    (built,) = (lib / "fineviti").glob("_C.*.so")
    shutil.copy2(built, package / built.name)
    code = (
        "import fineviti, fineviti._ext as e, numpy as np, torch\n"
        f"assert fineviti.__file__.startswith({str(package)!r}), fineviti.__file__\n"
        "assert e.load() and not torch.ops.fineviti.cuda_built()\n"
        "from fineviti.data.planner import plan_packs, plan_packs_ref\n"
        "lengths = np.array([5, 3, 7, 2, 9, 1])\n"
        "ours, ref = plan_packs(lengths, 10, 4, backend='cpp'), plan_packs_ref(lengths, 10, 4)\n"
        "assert all((a == b).all() for a, b in zip(ours, ref)), (ours, ref)\n"
        "grid = torch.tensor([[2, 3], [1, 1]], dtype=torch.int32)\n"
        "cu, pos = torch.ops.fineviti.build_positions(grid, 1)\n"
        "assert cu.tolist() == [0, 6, 7] and pos.shape == (7, 2), (cu, pos)\n"
    )
    run_python(code, cwd=tmp_path, PYTHONPATH=str(tmp_path / "site"))


def test_the_ops_are_listed_before_their_first_use():
    """fineviti.ops resolves its names lazily; dir() (tab completion, help()) listed none of them."""
    out = run_python("import fineviti.ops as o; names = dir(o); print(set(o.__all__) <= set(names), "
                     "'varlen_attention' in vars(o))", cwd=ROOT)
    assert out.split() == ["True", "False"]
