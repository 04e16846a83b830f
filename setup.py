"""mlmtrain: a low-level, performance-first BERT masked-language-model trainer.

The repository keeps the folders the design card names (`trainer/`, `kernels/`), but both of those
names are taken on PyPI (and transformers probes for a package called `kernels`), so they install
under one import root of our own: `trainer/` -> `mlmtrain`, `kernels/` -> `mlmtrain.kernels`,
`benchmarks/` -> `mlmtrain.benchmarks` (so `mlmtrain bench` works from an installed package).
"""
from setuptools import setup

setup(
    name="mlmtrain",
    version="0.1.0",
    description="Packed-sequence BERT MLM pretraining with a fused Triton masking kernel, "
    "exported as a transformers-compatible BertForMaskedLM.",
    python_requires=">=3.11",
    packages=["mlmtrain", "mlmtrain.kernels", "mlmtrain.benchmarks"],
    package_dir={"mlmtrain": "trainer", "mlmtrain.kernels": "kernels", "mlmtrain.benchmarks": "benchmarks"},
    package_data={"mlmtrain": ["assets/*", "configs/*.toml"]},
    install_requires=[
        "torch>=2.10",
        "tokenizers>=0.19",
        "numpy>=1.26",
        "huggingface_hub>=0.30",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=7", "transformers>=4.45", "matplotlib>=3.7", "accelerate>=0.26", "psutil>=5.9"],
        "bench": ["transformers>=4.45", "accelerate>=0.26", "matplotlib>=3.7", "psutil>=5.9"],
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["mlmtrain=mlmtrain.cli:main"]},
)
