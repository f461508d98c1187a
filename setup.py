"""Build of the compiled kernels (``quantkit._C`` and, on Hopper-capable toolchains, ``quantkit._C_sm90a``).

The CPU part is always built. The CUDA part is built when ``QUANTKIT_CUDA`` is ``1``, or when it is ``auto``
(the default) and both a CUDA toolkit (``CUDA_HOME``) and a CUDA build of torch are present -- a GPU is not
needed to compile. ``TORCH_CUDA_ARCH_LIST`` defaults to the architectures we target.
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _want_cuda() -> bool:
    flag = os.environ.get("QUANTKIT_CUDA", "auto").lower()
    if flag in ("0", "off", "no", "false"):
        return False
    have = CUDA_HOME is not None and torch.version.cuda is not None
    if flag in ("1", "on", "yes", "true") and not have:
        raise RuntimeError("QUANTKIT_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch was found")
    return have


cpu_sources = _rel([os.path.join(HERE, "kernels", "register.cpp")] + glob.glob(os.path.join(HERE, "kernels", "cpu", "*.cpp")))
cuda_sources = _rel(glob.glob(os.path.join(HERE, "kernels", "cuda", "*.cu")))
sm90a_sources = _rel(glob.glob(os.path.join(HERE, "kernels", "cuda", "sm90a", "*.cu")))

# -fopenmp: at::parallel_for is inline in ATen's headers and runs serially in a translation unit built without
# OpenMP; the extension then shares torch's libgomp (same soname), so torch.set_num_threads governs our kernels too.
# -ffp-contract=off: a written a * b + c stays a product and a sum (GCC's default contracts it into an FMA, one
# rounding), so epilogues round like the simulated layers' PyTorch ops; explicit FMA intrinsics are unaffected.
cxx_flags = ["-O3", "-fno-strict-aliasing", "-fopenmp", "-ffp-contract=off"]
if os.environ.get("QUANTKIT_ASAN") == "1":
    cxx_flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
link_flags = ["-fopenmp"] + (["-fsanitize=address"] if os.environ.get("QUANTKIT_ASAN") == "1" else [])

ext_modules = []
use_cuda = _want_cuda() and bool(cuda_sources)
if use_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext_modules.append(
        CUDAExtension(
            "quantkit._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(HERE, "kernels")],
            define_macros=[("QUANTKIT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    )
    if sm90a_sources and os.environ.get("QUANTKIT_SM90A", "1") != "0":
        ext_modules.append(
            CUDAExtension(
                "quantkit._C_sm90a",
                sm90a_sources,
                include_dirs=[os.path.join(HERE, "kernels")],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "-gencode=arch=compute_90a,code=sm_90a"],
                },
            )
        )
else:
    ext_modules.append(
        CppExtension(
            "quantkit._C",
            cpu_sources,
            include_dirs=[os.path.join(HERE, "kernels")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    )

if os.environ.get("QUANTKIT_SKIP_EXT") == "1":  # `make` installs the package once, then builds kernels in place
    ext_modules = []

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
