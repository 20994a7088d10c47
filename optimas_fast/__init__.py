"""optimas-fast: the Optimas method for compound AI systems, with fast primitives.

Subpackages are imported on use (``optimas_fast.ops``, ``optimas_fast.scheduler``, ...): importing the
top-level package stays cheap and never touches a GPU.
"""

__version__ = "0.1.0"
