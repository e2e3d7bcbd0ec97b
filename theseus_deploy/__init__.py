"""theseus-deploy: BERT-of-Theseus compression, export and benchmarking for BERT-family classifiers."""

__version__ = "0.1.0"
