"""Clustering library for MoDE-style data experts: balanced k-means, coarse grouping, assignment.

A pure library (torch, numpy, optional faiss); the ``cluster`` and ``assign`` stages wrap it.

* ``lloyd``: ``fit_kmeans``, Lloyd's iterations, balanced or not, on CPU or GPU;
* ``balanced``: the capacity-constrained greedy (``balanced_bounds``, ``assign_capacity``);
* ``nearest``: exact nearest-centre assignment (``assign_nearest``, ``auto_backend``);
* ``faiss_backend``: ``fit_faiss_kmeans`` (the ``faiss.Kmeans`` baseline) and faiss search;
* ``seeding``: the uniform sample and k-means++; ``coarse``: fine centres into experts;
* ``common``: the result type, argument checks and row helpers shared by the above.
"""

from stages.clustering.balanced import assign_capacity, balanced_bounds
from stages.clustering.coarse import coarse_cluster
from stages.clustering.common import BACKENDS, INITS, METRICS, KMeansResult
from stages.clustering.faiss_backend import fit_faiss_kmeans
from stages.clustering.lloyd import fit_kmeans
from stages.clustering.nearest import assign_nearest, auto_backend

__all__ = [
    "BACKENDS",
    "INITS",
    "METRICS",
    "KMeansResult",
    "assign_capacity",
    "assign_nearest",
    "auto_backend",
    "balanced_bounds",
    "coarse_cluster",
    "fit_faiss_kmeans",
    "fit_kmeans",
]
