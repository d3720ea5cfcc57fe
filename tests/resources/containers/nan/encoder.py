"""Hostile test encoder: answers with a NaN in the first item."""

import numpy as np
from _contract import D, answer, frames


def f(item):
    x = np.zeros((frames(item), D), np.float32)
    x[0, 0] = np.nan
    return x
answer(f)
