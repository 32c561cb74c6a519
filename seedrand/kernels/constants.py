"""The Philox-4x32-10 constants (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
and the word-to-float factor, in one place for every implementation: the torch reference (``philox``), the numba
CPU kernels (``cpu_philox``); Triton's ``tl.randint`` uses the same constants, which ``tests/test_triton_regen.py``
checks bit for bit against the reference."""

__all__ = ["PHILOX_ROUNDS", "PHILOX_MULTIPLIERS", "PHILOX_KEY_BUMP", "UINT32_TO_UNIT"]

PHILOX_ROUNDS = 10
PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # (A, B): the two 32x32 -> 64-bit products of a round
PHILOX_KEY_BUMP = (0x9E3779B9, 0xBB67AE85)  # Weyl increments of the two key words after every round
# Triton's uint32 -> [0, 1) factor (as float32, the float just below 2**-31): the folded int32 word times it is
# Triton's uniform
UINT32_TO_UNIT = 4.6566127342e-10
