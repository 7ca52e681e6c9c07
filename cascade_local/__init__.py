"""cascade-local: run Nemotron-Cascade-2-30B-A3B on your own desktop."""

__version__ = "0.1.0"
