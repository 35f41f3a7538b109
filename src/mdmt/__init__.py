"""mdmt: multi-dataset multi-task learning for chest X-rays."""

__version__ = "0.1.0"
