"""Evaluation: TAE banks, the transfer matrix R[f_t, f_s, A] (Eq. 5-7) and its tables."""
