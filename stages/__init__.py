"""Funnel stages: retrieval, early-stage rankers (two-tower, GESR), late-stage ranker."""
