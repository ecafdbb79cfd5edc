"""Small helpers shared by the strategy's parts."""
from __future__ import annotations

import logging
import warnings

log = logging.getLogger("lightning_codedreduce.strategy")


def _rank_zero_warn(strategy, message: str, category=UserWarning) -> None:
    if strategy.global_rank == 0:
        warnings.warn(message, category, stacklevel=3)


def _rank_zero_info(strategy, message: str) -> None:
    """Through Lightning's own info logger (shown by default, like Lightning's set-up messages)."""
    if strategy.global_rank == 0:
        try:
            strategy._ns("utilities.rank_zero").rank_zero_info(message)
        except (ImportError, AttributeError):
            log.info(message)

