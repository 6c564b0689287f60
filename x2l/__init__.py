"""x2l: task-aware bi-level KV compression for long-video question answering (Video-X^2L)."""

__version__ = "0.1.0"
