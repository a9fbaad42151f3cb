"""The DFlash drafter model (re-exported).

It lives in `draftopd.dflash`, the self-contained module every checkpoint carries verbatim
as its remote code, so draftopd and `trust_remote_code` loaders run the same code.
"""

from draftopd.dflash import (  # noqa: F401
    MLP,
    Attention,
    ContextCache,
    DecoderLayer,
    DFlashDraftModel,
    DraftHead,
    RMSNorm,
    Rotary,
    apply_rope,
    check_draft_vocab,
    context_features,
    default_target_layer_ids,
)
