"""Funnel stages: retrieval, early-stage rankers (two-tower, GESR), late-stage ranker.

`cascade.stages.check_stage(cls, kind)` is the conformance check every stage should pass
(`cascade.stages.conformance`); it is imported on first use, so importing a stage module stays
cheap.
"""

__all__ = ["check_stage"]


def __getattr__(name: str):
    if name == "check_stage":
        from cascade.stages.conformance import check_stage

        return check_stage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
