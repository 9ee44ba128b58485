"""fer-exp: tracked, reproducible facial emotion recognition experiments on FER2013."""

__version__ = "0.1.0"
