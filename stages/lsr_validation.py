"""The late-stage ranker's validation metrics (early stopping), apart from the model.

- `generative_ndcg`: full-catalogue NDCG@10 of the generative head alone (the pretraining phase);
- `rerank_ndcg`: NDCG@10 of the whole model re-ranking the head's top n (the joint phase).
Both leave a request's history out when the run leaves seen items out, and rank as the run's
metrics do (`cascade.util.ranking`: ties count against the target). `model` is the LSR's
`LSRModel` (not imported here: the model's module imports this one).
"""

from __future__ import annotations

import math
import numpy as np
import torch
from torch import Tensor, nn

from cascade.stages.features import exclude_history_, recent_history
from cascade.util.ranking import ndcg, ranks_from_scores


def newest_output(hist_out: Tensor, hist_len: Tensor) -> Tensor:
    """(B, N, D) history outputs -> (B, D) the output at the newest event (0 without history)."""
    b = torch.arange(hist_out.shape[0], device=hist_out.device)
    newest = hist_out[b, (hist_len - 1).clamp_min(0)]
    return newest * (hist_len > 0)[:, None].to(newest.dtype)



def next_keys(model: nn.Module, device: torch.device) -> Tensor:
    """(n_items, D) the generative head's key of every item, in chunks."""
    n_items = model.items.n_items
    return torch.cat([
        model.next_key(model.items(torch.arange(s, min(s + 65536, n_items), device=device)))
        for s in range(0, n_items, 65536)
    ])


@torch.no_grad()
def generative_ndcg(model: nn.Module, traffic, exclude_seen: bool, device: torch.device) -> float:
    """Full-catalogue NDCG@10 of the generative head alone (the pretraining phase's early
    stopping): every item scored by <query, key>, seen items left out when the run leaves them
    out; ranks and NDCG are `cascade.util.ranking`'s (ties count against the target)."""
    model.eval()
    keys = next_keys(model, device)
    per_request = []
    for batch in traffic.batches(256):
        batch = batch.to(device)
        short = recent_history(batch, model.width)
        enc = model.encode(short)
        head = model.next_query(newest_output(enc.state.output, short.hist_len) + enc.user) @ keys.T
        if exclude_seen:
            exclude_history_(head, batch)
        ranks = ranks_from_scores(head.cpu().numpy(), batch.targets[:, :1].cpu().numpy())
        per_request.append(ndcg(ranks, k=10))
    return float(np.concatenate(per_request).mean()) if per_request else 0.0


@torch.no_grad()
def rerank_ndcg(
    model: nn.Module, traffic, n_candidates: int, exclude_seen: bool, device: torch.device
) -> float:
    """NDCG@10 of the full model re-ranking the generative head's top `n_candidates` items (a
    miss when the target is not among them): a cheap stand-in for the full-catalogue NDCG@10 the
    LSR is judged on, at n_candidates scores per request. With `exclude_seen` (the run's, as for
    retrieval) the request's whole history is left out, as the run's reference does. Ranks and
    NDCG are `cascade.util.ranking`'s, as the run's metrics (ties count against the target)."""
    model.eval()
    n_items = model.items.n_items
    keys = next_keys(model, device)  # (n_items, D)
    per_request = []
    for batch in traffic.batches(256):
        batch = batch.to(device)
        short = recent_history(batch, model.width)  # what the encoder sees
        enc = model.encode(short)
        query = model.next_query(newest_output(enc.state.output, short.hist_len) + enc.user)
        head = query @ keys.T
        if exclude_seen:
            exclude_history_(head, batch)
        top = head.topk(min(n_candidates, n_items), dim=1)
        # a request with fewer unseen items than n_candidates gets some seen ones (-inf):
        # they never outrank the target, and a seen target is a miss
        scores = model.score_with(enc, top.indices).masked_fill(~torch.isfinite(top.values), -math.inf)
        is_t = top.indices == batch.targets[:, :1]
        col = torch.where(is_t.any(1), is_t.float().argmax(1), -1)  # -1: not among them
        ranks = ranks_from_scores(scores.cpu().numpy(), col[:, None].cpu().numpy())  # (B, 1)
        per_request.append(ndcg(ranks, k=10))
    return float(np.concatenate(per_request).mean()) if per_request else 0.0
