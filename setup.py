import re
from pathlib import Path

from setuptools import find_packages, setup

# The one version source: theseus_deploy/__init__.py (the CLI's --version and the manifests read it there).
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "theseus_deploy" / "__init__.py").read_text(),
                    re.M).group(1)

SERVE = ["tritonclient[grpc,http]>=2.50,<3", "pyzmq>=23", "sh>=1.14", "typing_inspect>=0.6", "wrapt>=1.11",
         "typer>=0.9", "importlib_metadata>=7", "aiohttp>=3.8,<4"]

setup(
    name="theseus-deploy",
    version=VERSION,
    description="BERT-of-Theseus compression, ONNX/TensorRT export and latency benchmarks for BERT-family classifiers",
    python_requires=">=3.10",
    packages=find_packages(include=["theseus_deploy*"]),
    package_data={"theseus_deploy.bench": ["baselines/*.json"], "theseus_deploy.serve": ["triton_models/*.py"]},
    install_requires=[
        # CPU wheel; GPU users install their CUDA build of torch first (see README).
        "torch>=2.4",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "accelerate>=1.0",
        "click>=8.1",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "numpy>=1.24",
        "tqdm>=4.60",
        "onnx>=1.16",
        # 1.31 added the fusion patterns of transformers 5's attention: 1.30 fuses no Attention.
        "onnxruntime>=1.31",
        "onnxscript>=0.3",
        "matplotlib>=3.7",
        "psutil>=5.9",
    ],
    extras_require={
        "gpu": ["onnxruntime-gpu>=1.31"],
        "trt": ["tensorrt>=10.0", "onnxruntime-gpu>=1.31"],
        # Serving (theseus_deploy/serve): nvidia-pytriton 0.7.0 itself pins numpy<2 for its Python-backend
        # stub, so `make install` installs it with --no-deps and gives the stub its own environment
        # (<venv>/triton-stub-env, see theseus_deploy/serve/server.py); these are its other dependencies.
        "serve": SERVE,
        "dev": ["pytest>=7", "ruff>=0.6"] + SERVE,
    },
    entry_points={"console_scripts": ["theseus-deploy=theseus_deploy.cli:main"]},
)
