"""Well-behaved but hungry test encoder: holds 96 MiB for 1.5 s, then answers (peak memory is measured)."""
import time

import numpy as np
from _contract import answer

hold = np.ones(96 << 20, np.uint8)  # touched pages: really resident
time.sleep(1.5)
answer()
