"""Conveyor: pipeline-parallel training of transformer language models on PyTorch."""

__version__ = "0.1.0"
