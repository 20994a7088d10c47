"""Preference data for the LRF: candidate sampling, downstream rollouts, all-ordered-pairs building, PairStore.

store = PairStore()
res = collect_preferences(system, "solver", batch, random.Random(0), CollectConfig(num_candidates=4), store)
rm.adapt(res.train_pairs)
"""

from optimas_fast.preference.collect import (
    CollectConfig,
    CollectResult,
    collect_preferences,
    example_key,
    sample_variants,
)
from optimas_fast.preference.pairs import PairStore, build_pairs, is_held_out, pair_weights

__all__ = [
    "CollectConfig",
    "CollectResult",
    "collect_preferences",
    "example_key",
    "sample_variants",
    "PairStore",
    "build_pairs",
    "is_held_out",
    "pair_weights",
]
