"""draftopd: train DFlash block drafters for lossless speculative decoding (SFT and Draft-OPD).

The library's front door, imported lazily (torch loads on first use, not on `import draftopd`):
`load_target`, `init_drafter`, `load_drafter`, `save_drafter`, `spec_generate`, `measure_verify_costs`.
"""

_EXPORTS = {
    "load_target": "draftopd.model.target",
    "init_drafter": "draftopd.model.checkpoint",
    "load_drafter": "draftopd.model.checkpoint",
    "save_drafter": "draftopd.model.checkpoint",
    "spec_generate": "draftopd.dflash",
    "measure_verify_costs": "draftopd.decoding.costs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'draftopd' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
