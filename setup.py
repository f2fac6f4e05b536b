from setuptools import setup

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
)
