"""Helpers for torch futures."""
from __future__ import annotations

from typing import Any, Iterable

import torch


def wait_all(futures: Iterable[torch.futures.Future]) -> list[Any]:
    """Wait for every future, then raise the first error if any failed; else their values.

    Unlike ``torch.futures.wait_all``, nothing is left running when this raises.
    """
    values, errors = [], []
    for f in futures:
        try:
            values.append(f.wait())
        except BaseException as e:
            errors.append(e)
    if errors:
        raise errors[0]
    return values
