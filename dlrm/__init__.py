"""dlrm: a DLRM trainer with swappable embedding backends.

Data flows one way: parquet -> loader -> Batch -> DLRM (embedding backend -> interaction -> MLPs)
-> loss -> optimizers; telemetry observes. See README.md.
"""

__version__ = "0.1.0"
