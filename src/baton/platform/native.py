"""baton's C++ CPU kernels (csrc/cpu_kernels.cpp): built by the install step,
loaded where the CPU can run them, absent otherwise (the eager path runs).

    baton build-kernels    # scripts/setup.sh runs this

The extension is compiled for AVX2 + FMA + F16C (not -march=native, so a build
moved to another x86 host still loads where those exist); `kernels()` checks
the CPU's capability before loading it, and says once, in one line, why the
eager path is taken when it does not load.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

HERE = Path(__file__).parent
SOURCE = HERE / "csrc" / "cpu_kernels.cpp"
BUILD_DIR = HERE / "_native"
NAME = "baton_cpu_kernels"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++20"]
DISABLE_ENV = "BATON_NATIVE_KERNELS"  # "0": never load them (the eager reference path)

_module = None
_why_not: Optional[str] = None


def cpu_supported() -> bool:
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def kernels():
    """The extension module, or None (eager fallback)."""
    global _module, _why_not
    if _module is not None or _why_not is not None:
        return _module
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _why_not = f"{DISABLE_ENV}=0"
        return None
    if not cpu_supported():
        _why_not = "this CPU lacks AVX2"
    else:
        built = sorted(BUILD_DIR.glob(f"{NAME}*.so"))
        if not built:
            _why_not = "not built (run: baton build-kernels)"
        else:
            import importlib.util

            importlib.import_module("torch")  # first: the extension links against libtorch

            try:
                spec = importlib.util.spec_from_file_location(NAME, built[-1])
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                _module = mod
            except ImportError as e:  # built against another torch, say
                _why_not = f"failed to load {built[-1].name}: {e}"
    if _why_not:
        warnings.warn(f"baton: fused CPU kernels off ({_why_not}); using the eager PyTorch path", stacklevel=2)
    return _module


def build(verbose: bool = False) -> Path:
    """Compile the extension into BUILD_DIR with setuptools (no ninja needed);
    setuptools' messages are shown with `verbose` or when it fails (ninja, where
    present, prints its command line itself)."""
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    BUILD_DIR.mkdir(exist_ok=True)
    tmp = BUILD_DIR / "tmp"
    ext = CppExtension(NAME, [str(SOURCE)], extra_compile_args=FLAGS, extra_link_args=["-fopenmp"])
    import contextlib
    import io

    argv, log = sys.argv, io.StringIO()
    try:
        sys.argv = ["setup.py"]
        with contextlib.redirect_stdout(sys.stdout if verbose else log):
            setup(name=NAME, ext_modules=[ext], cmdclass={"build_ext": BuildExtension},
                  script_args=["-q" if not verbose else "-v", "build_ext", "--build-lib", str(BUILD_DIR),
                               "--build-temp", str(tmp)])
    except BaseException:
        print(log.getvalue()[-4000:], file=sys.stderr)
        raise
    finally:
        sys.argv = argv
    return sorted(BUILD_DIR.glob(f"{NAME}*.so"))[-1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["build"]:
        print("usage: baton build-kernels", file=sys.stderr)
        return 2
    if not cpu_supported():
        print("baton: this CPU lacks AVX2; the fused CPU kernels are not built (the eager path runs)")
        return 0
    try:
        path = build("-v" in argv)
    except (Exception, SystemExit) as e:  # no compiler, say: the eager path still works
        print(f"baton: building the fused CPU kernels failed ({e}); the eager path runs")
        return 0
    print(f"baton: fused CPU kernels built: {path.relative_to(HERE.parent.parent.parent) if path.is_relative_to(HERE.parent.parent.parent) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
