"""GESR: the Generative Early Stage Ranker (Hong et al., arXiv 2511.21095), `--esr gesr`.

- `config.py`: `GESRConfig`, `MoAConfig` (module switches, MoA Config preprocessing);
- `hma.py`: Hard Matching Attention; `cross.py`: NRO / RO cross attention;
  `mlpg.py`: Multi-Logit Parameterized Gating; target-aware self attention is the shared
  `cascade.stages.hstu.TargetAwareEncoder`;
- `model.py`: `GESRModel` (towers + MoA + MLPG, serving path and the per-candidate reference);
  `state.py`: its serving state (per-request `RequestState`, the per-item `ItemCache`);
- `stage.py`: `GESRStage`, the registered ranker (training, caching, scoring).

Importing this package registers the stage (`@register("esr", "gesr")`).
"""

from cascade.stages.gesr.config import GESRConfig, MoAConfig
from cascade.stages.gesr.model import GESRModel
from cascade.stages.gesr.stage import GESRStage

__all__ = ["GESRConfig", "GESRModel", "GESRStage", "MoAConfig"]
