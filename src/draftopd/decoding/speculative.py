"""Lossless block speculative decoding with a DFlash drafter, batch size 1 (re-exported).

`spec_generate` lives in `draftopd.dflash`, the self-contained module every checkpoint
carries as its remote code, so `AutoModel.from_pretrained(dir, trust_remote_code=True)
.spec_generate(...)` and draftopd decode with the same loop.
"""

from draftopd.dflash import VERIFY_ROWS, SpecResult, _cache_kwarg, crop_cache, spec_generate  # noqa: F401
