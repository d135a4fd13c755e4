"""dmeta: an MPI-parallel experiment engine for decentralized meta-learning (Dif-MAML)."""

__version__ = "0.1.0"
