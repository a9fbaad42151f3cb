"""draftopd: train DFlash block drafters for lossless speculative decoding (SFT and Draft-OPD)."""
