"""SemCKD (Chen et al., AAAI 2021) as a distributed experiment system on Ray and MLflow."""

__version__ = "0.1.0"
