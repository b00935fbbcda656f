"""Install laco_kernels; builds the optional C++ extension ``laco_kernels._C`` when it can.

The extension (csrc/) needs torch at build time, so install with
``pip install --no-build-isolation -e ".[hf,dev]"`` after ``pip install torch==2.13.0``
(pyproject.toml makes pip build through PEP 517/660 in that venv; see its comment). A build
that cannot import torch stops with instructions; ``LACO_NO_EXT=1`` skips the extension. A
compiler failure warns and the package still installs; ``import laco_kernels`` then warns that
the CPU ops run the PyTorch reference.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension_kwargs():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("LACO_NO_EXT", "0") not in ("", "0"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        # never a silent install without the native kernels (issue 13): an isolated build cannot
        # see the venv's torch, and listing torch as a build requirement would pull a CUDA wheel
        raise SystemExit(
            "laco_kernels: torch is not importable at build time, so the C++ extension laco_kernels._C "
            "cannot be built. Install torch first, then build without isolation:\n"
            "    pip install torch==2.13.0 && pip install --no-build-isolation -e \".[hf,dev]\"\n"
            "or set LACO_NO_EXT=1 to install without the native CPU kernels (the PyTorch reference runs).")

    class OptionalBuildExtension(BuildExtension):
        """Build the extension if possible; never fail the install because of it."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure means "no extension"
                print(f"laco_kernels: C++ extension not built ({exc}); the CPU path uses the reference",
                      file=sys.stderr)

    # -O3 and OpenMP; vector width is chosen at run time inside the sources (target attributes),
    # so the binary stays portable across x86-64 machines.
    ext = CppExtension(
        "laco_kernels._C", sources,
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}}


setup(
    name="laco_kernels",
    version="0.1.0",
    description="Fast and recoverable pruned LLMs: Triton sparse GEMMs, pruning, layer-wise recovery",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["laco_kernels", "laco_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.3", "numpy", "safetensors>=0.4", "tqdm"],
    extras_require={
        "hf": ["transformers>=4.45", "accelerate", "gguf", "peft", "compressed-tensors", "lm-eval",
               "matplotlib", "sentencepiece"],
        "dev": ["pytest", "pytest-timeout", "pytest-benchmark", "hypothesis"],
    },
    entry_points={"console_scripts": ["laco=laco_kernels.cli:main"]},
    **_extension_kwargs(),
)
