"""The estimation engine: collect pooled activations, fit maps causally in one pass, estimate."""

from .causal import fit_causal_one_pass
from .collect import Site, check_texts, collect, collect_sites, execution_order
from .estimate import balance, estimate

__all__ = ["Site", "balance", "check_texts", "collect", "collect_sites", "estimate", "execution_order", "fit_causal_one_pass"]
