"""speechgpt-fairseq: SpeechGPT training as a fairseq plugin."""
from setuptools import find_packages, setup

setup(
    name="speechgpt-fairseq",
    version="0.1.0",
    description="Train SpeechGPT-style speech language models (LLaMA + discrete speech units) with fairseq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["speechgpt_fairseq", "speechgpt_fairseq.*"]),
    package_data={"speechgpt_fairseq": ["presets/model/*.yaml", "data/templates/*.txt"]},
    # torch and fairseq-fixed are installed by scripts/install.sh (torch's build depends on the machine;
    # fairseq-fixed must be built without build isolation and without its torchaudio requirement).
    install_requires=[
        "numpy>=1.24",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "sentencepiece>=0.1.99",
        "protobuf>=3.20",
        "tokenizers>=0.15",
        "transformers>=4.40",
        "safetensors>=0.4",
        "tqdm",
        "scikit-learn",
        "joblib",
        "soundfile",
        "soxr",
        "kaldi-native-fbank",
        "editdistance",
        "matplotlib",
    ],
    extras_require={"test": ["pytest>=7", "peft>=0.10"]},
    entry_points={"console_scripts": ["speechgpt = speechgpt_fairseq.cli.main:main"]},
)
