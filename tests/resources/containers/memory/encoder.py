"""Hostile test encoder: eats memory in 64 MiB steps (up to 8 GiB); answers normally only if it gets it all."""

import numpy as np
from _contract import answer

hog = []
for _ in range(128):
    hog.append(np.ones(64 << 20, np.uint8))
answer()
