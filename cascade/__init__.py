"""cascade: an end-to-end cascading recommender simulator.

Retrieval (FAISS) -> early-stage ranking (two-tower or GESR) -> late-stage ranking, replayed over
logged or synthetic traffic, reporting recall through the funnel and per-stage latency.
"""

__version__ = "0.1.0"
