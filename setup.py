"""Builds fastreg._C: the C++ host part always, the CUDA part when possible.

FASTREG_CUDA=0 forces the CUDA part off, FASTREG_CUDA=1 forces it on (and fails
clearly if there is no toolchain). Unset: CUDA is built when torch was built with
CUDA and nvcc is found. Kernels never include torch headers (they take raw
pointers), so the build is quick: the binding file includes only pybind11.

Sources are globbed per directory, so a new family adds its files and one line
in csrc/bindings.cpp, nothing here.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _locate_cuda_home():
    """torch guesses CUDA_HOME from nvcc's PATH entry; a wrapper or link such as
    /usr/local/bin/nvcc makes that /usr/local, which has no CUDA headers. Pick
    the first candidate that really is a toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()


def _want_cuda():
    flag = os.environ.get("FASTREG_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"FASTREG_CUDA must be 0, 1 or unset, got {flag!r}")
    import torch
    from torch.utils import cpp_extension

    nvcc = None
    if cpp_extension.CUDA_HOME and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h")
    ):
        cand = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    nvcc = nvcc or shutil.which("nvcc")
    have = torch.version.cuda is not None and nvcc is not None
    if flag == "0":
        return False
    if flag == "1" and not have:
        why = "torch was built without CUDA" if torch.version.cuda is None else "nvcc was not found"
        raise SystemExit(f"FASTREG_CUDA=1 but the CUDA part cannot be built: {why}")
    return have


def _extensions():
    from torch.utils import cpp_extension

    rel = lambda pattern: sorted(  # noqa: E731
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern))
    )
    sources = ["csrc/bindings.cpp"] + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc")]
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += rel("csrc/cuda/*.cu")
        return [
            cpp_extension.CUDAExtension(
                "fastreg._C",
                sources,
                include_dirs=include_dirs,
                define_macros=[("FASTREG_WITH_CUDA", "1")],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
                },
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "fastreg._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def _cmdclass():
    from torch.utils import cpp_extension

    return {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages(include=["fastreg", "fastreg.*"]) + ["fastreg.kernels"]
    + ["fastreg.kernels." + p for p in find_packages("kernels")],
    package_dir={"fastreg.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
