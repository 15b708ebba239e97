"""Retry as a wrapper: one bounded backoff loop around any transport operation.

As restic's ``backend/retry`` wraps a backend rather than retrying inside each
call, a transport hands the operation, its way of classifying a failure and
its clean-up to :func:`with_retry`. Transient failures
(``TransientTransportError``: a broken link) are retried with exponential
backoff; everything else is raised at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from exchange.errors import ExchangeError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """Bounded exponential backoff for transient failures: base, 2*base, 4*base..."""

    attempts: int = 4
    base: float = 0.5
    max_delay: float = 8.0

    def delays(self) -> Iterator[float]:
        delay = self.base
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_delay)


def with_retry(op: Callable[[], T], *, policy: Retry, classify: Callable[[Exception], ExchangeError | None],
               after_failure: Callable[[ExchangeError], None], where: str,
               logger: logging.Logger = log, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``op``; retry it while it fails transiently, at most ``policy.attempts`` times in all.

    ``classify`` maps a failure to the ExchangeError to report (None: a bug,
    re-raised as is); ``after_failure`` runs after every classified failure,
    before any retry (e.g. drop a broken connection). The last error is raised
    chained to its cause, noting how many attempts were made. Each retry is
    logged as a warning on ``logger`` (the transport's own).
    """
    delays = policy.delays()
    attempt = 0
    while True:
        attempt += 1
        try:
            return op()
        except Exception as exc:
            err = classify(exc)
            if err is None:
                raise
            after_failure(err)
            if not err.transient:
                if err is exc:
                    raise
                raise err from exc
            delay = next(delays, None)
            if delay is None:
                if attempt > 1:
                    err.message += f" (gave up after {attempt} attempts)"
                if err is exc:
                    raise
                raise err from exc
            logger.warning("%s: %s; retrying in %.1fs (attempt %d of %d)", where, err, delay,
                        attempt + 1, policy.attempts)
            sleep(delay)
