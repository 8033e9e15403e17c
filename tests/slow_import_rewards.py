"""A reward module that is slow to import, as a user module that imports torch is on a slow machine.

The spawned reward worker imports it when it unpickles the first call; that import must not count
against ``reward.timeout_s`` (tests/test_reward_signatures.py).
"""

from __future__ import annotations

import time

IMPORT_DELAY_S = 1.5
time.sleep(IMPORT_DELAY_S)


def row_len_slow_module(completion, answer):
    return float(len(completion))
