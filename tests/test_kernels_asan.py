"""AddressSanitizer run of the CPU kernels: builds ``quantkit._C`` with ``QUANTKIT_ASAN=1`` (see setup.py) into a
temporary directory and runs the kernel tests against that build with libasan preloaded. Any out-of-bounds access
in a kernel aborts the child run with an ASan report, which this test prints.

Run it alone with ``python -m pytest -q tests/test_kernels_asan.py`` (about 2-3 minutes on 2 cores).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Kernel test files run under ASan (every ISA level each: they parametrize over QUANTKIT_CPU_ISA). The hostile-input
# suite covers every op (adder, elementwise and packing included) with few examples per property.
ASAN_TEST_FILES = ["tests/test_ops_packing.py", "tests/test_ops_binary.py", "tests/test_ops_binary_prepacked.py",
                   "tests/test_ops_hostile.py", "tests/test_ops_int8.py", "tests/test_pooling.py",
                   "tests/test_adder_fused.py", "tests/test_ops_adder.py::test_thermometer_form_equals_bytes_form",
                   "tests/test_ops_adder.py::test_packed_conv2d_pixel_vector_kernel",
                   "tests/test_ops_adder.py::test_fused_quantizer_exact_at_rounding_boundaries",
                   "tests/test_ops_adder.py::test_packed_conv2d_with_weights_past_l2",
                   "tests/test_ops_adder.py::test_packed_strided_pointwise_conv_reads_only_its_pixels",
                   "tests/test_conv_pool.py::test_stem_kernel_equals_its_reference_every_isa",
                   "tests/test_conv_pool.py::test_stem_kernel_nan_and_inf_reach_the_pool_as_torch_does"]
# Tests that only start subprocesses (nothing for ASan to see in this process, and slow under it), and the whole-model
# tests of the prepacked ops and of the fused adder blocks (their kernel calls are the ones the op tests make, on
# models that are slow under ASan).
ASAN_DESELECT = ("not import_quantkit_registers and not converted_resnet and not fused_adder_model "
                 "and not convert_fuses_every_adder")


def _runtime_lib(name: str) -> str | None:
    """Absolute path of a runtime library of the C++ toolchain (``c++ -print-file-name``), or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None
    try:
        path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    p = path.stdout.strip()
    return os.path.realpath(p) if os.path.isabs(p) and os.path.exists(p) else None


@pytest.mark.slow
def test_cpu_kernels_clean_under_asan(tmp_path):
    libasan = _runtime_lib("libasan.so")
    libstdcxx = _runtime_lib("libstdc++.so")
    if libasan is None or libstdcxx is None:
        pytest.skip("the C++ toolchain has no libasan.so (install the compiler's AddressSanitizer runtime)")
    env = dict(os.environ, QUANTKIT_ASAN="1", QUANTKIT_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    build_lib, build_tmp = tmp_path / "lib", tmp_path / "tmp"
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(build_lib), "--build-temp", str(build_tmp)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert build.returncode == 0, "ASan build of the CPU kernels failed:\n" + build.stdout[-4000:] + build.stderr[-4000:]
    # A copy of the Python package next to the ASan extension, first on sys.path for the child interpreter.
    pkg = tmp_path / "lib" / "quantkit"
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = list(pkg.glob("_C*" + ext_suffix)) if pkg.exists() else []
    assert built, f"no _C{ext_suffix} in {pkg}"
    shutil.copytree(REPO / "quantkit", pkg, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    child_env = dict(
        os.environ,
        PYTHONPATH=str(build_lib) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        # libstdc++ must be loaded when ASan starts, or its __cxa_throw interceptor finds no real function and
        # aborts at the first C++ exception thrown by another extension (triton's, imported by opcheck).
        LD_PRELOAD=libasan + " " + libstdcxx,
        QUANTKIT_HYPOTHESIS_EXAMPLES="12",
        # Python and torch keep allocations alive at exit on purpose; report memory errors, not leaks.
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1",
    )
    child_env.pop("QUANTKIT_CPU_ISA", None)
    probe = subprocess.run(
        [sys.executable, "-c", "import quantkit.ops as o, quantkit._C as c; print(c.__file__, o.cpu_isa())"],
        cwd=tmp_path, env=child_env, capture_output=True, text=True,
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    assert str(build_lib) in probe.stdout, f"the child did not load the ASan build: {probe.stdout}"
    tests = [str(REPO / f) for f in ASAN_TEST_FILES]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(REPO), "-k",
         ASAN_DESELECT, *tests],
        cwd=tmp_path, env=child_env, capture_output=True, text=True,
    )
    out = run.stdout[-6000:] + run.stderr[-8000:]
    assert "AddressSanitizer" not in out, out
    assert run.returncode == 0, out
