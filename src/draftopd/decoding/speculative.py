"""Lossless block speculative decoding with a DFlash drafter, batch size 1 (re-exported).

`spec_generate` lives in `draftopd.dflash`, the self-contained module every checkpoint
carries as its remote code, so `AutoModel.from_pretrained(dir, trust_remote_code=True)
.spec_generate(...)` and draftopd decode with the same loop. Its `target` is draftopd's
`Target` or a bare HF causal LM (`dflash._as_model` takes `.model` of the first): the remote
code cannot import draftopd, and its callers hold the bare model.
"""

from draftopd.dflash import (  # noqa: F401
    MAX_REST, TREE_TOP, VERIFY_ROWS, DraftTree, SpecResult, VerifyCosts, check_full_attention, check_masked_attention,
    crop_cache, draft_tree, keep_cache_rows, spec_generate, tree_accept, tree_mask,
)
from draftopd.dflash import _as_model as bare_model  # noqa: F401  (the HF model of a Target, or the model itself)
from draftopd.dflash import _cache_kwarg as cache_kwarg  # noqa: F401  (the KV-cache keyword a forward takes)
