"""Progress of a long loop over files: a tqdm bar on a terminal, otherwise one line per 10 % done."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(results: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Yield `results` (`total` of them) while showing progress on stderr (tqdm) or stdout (plain lines)."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(results, total=total, desc=desc, unit="file")
        return
    shown = 0
    for done, r in enumerate(results, 1):
        yield r
        decile = done * 10 // max(total, 1)
        if decile > shown:
            shown = decile
            print(f"{desc}: {decile * 10}% ({done}/{total})", flush=True)
