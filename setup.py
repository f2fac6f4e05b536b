import os

from setuptools import setup


def ahead_of_time_extension():
    """MLORC_BUILD_EXT=1 compiles csrc/ now, into a library beside mlorc.py that mlorc loads instead
    of building it on first use. torch must be importable while building:
        MLORC_BUILD_EXT=1 pip install --no-build-isolation .
    The CUDA kernels are included when torch has CUDA and nvcc is found (on a machine without a
    GPU, set TORCH_CUDA_ARCH_LIST, e.g. "9.0" for H100)."""
    if os.environ.get("MLORC_BUILD_EXT") != "1":
        return {}
    import torch
    from torch.utils import cpp_extension

    import mlorc
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.relpath(path, here) for path in mlorc.extension_sources(with_cuda)]
    flags = {"cxx": mlorc.CXX_FLAGS + mlorc.OPENMP_FLAGS, "nvcc": mlorc.CUDA_FLAGS}
    extension = kind("mlorc_ext", sources, extra_compile_args=flags, extra_link_args=mlorc.OPENMP_FLAGS)
    return dict(ext_modules=[extension], cmdclass={"build_ext": cpp_extension.BuildExtension})


setup(
    name="mlorc",
    version="0.1.0",
    description="MLorc: momentum low-rank compression optimizers for memory-efficient full fine-tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    py_modules=["mlorc"],
    python_requires=">=3.9",
    install_requires=["torch>=2.1"],
    extras_require={
        # ninja builds the optional C++/CUDA extension in csrc/ on first use
        "ext": ["ninja"],
        "test": [
            "pytest",
            "hypothesis",
            "numpy",
            "ninja",
            # the uncompressed reference optimizers that the full-rank tests compare against
            "lion-pytorch",
            "prodigyopt",
            "dadaptation",
            "torch-adopt",
            "came-pytorch",
            # Hugging Face Trainer integration tests
            "transformers",
            "accelerate",
            "peft",
        ],
        # tutorial.ipynb: plotting, executing notebooks, and the GaLore / LoRA baselines it compares
        "tutorial": ["matplotlib", "nbclient", "nbformat", "ipykernel", "galore-torch", "peft",
                     "transformers"],
    },
    license="MIT",
    **ahead_of_time_extension(),
)
