"""Deepen a trained drafter without losing what it learned.

Each new layer is a copy of the layer it follows with its two output projections (attention
`o_proj`, MLP `down_proj`) zeroed: its residual branches add nothing, so the grown drafter
computes exactly what the original did, and training starts from the original's acceptance
rather than from a loss spike (zero-initialised residual branches, as in depth up-scaling).
The copied projections give the new layers useful features from the first step on.
"""

import copy

import torch

from draftopd.dflash import DFlashDraftModel
from draftopd.errors import DraftOPDError

ZEROED = ("self_attn.o_proj", "mlp.down_proj")  # the residual branches' last projections


def grown_layer_sources(old: int, new: int) -> list[int]:
    """Which old layer each of the `new` layers copies, spread evenly: 2 -> 4 is [0, 0, 1, 1]."""
    return [i * old // new for i in range(new)]


@torch.no_grad()
def grow_drafter(draft: DFlashDraftModel, num_layers: int) -> DFlashDraftModel:
    """`draft` with `num_layers` layers, equal in output; the same object if it has that many already."""
    old = len(draft.layers)
    if num_layers < old:
        raise DraftOPDError(f"draft.num_layers={num_layers} is fewer than the {old} layers of the drafter it "
                            f"starts from; a drafter can be grown, not cut (omit num_layers to keep {old})")
    if num_layers == old:
        return draft
    config = copy.deepcopy(draft.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * num_layers
    grown = DFlashDraftModel(config).to(device=draft.fc.weight.device, dtype=draft.fc.weight.dtype)
    state = {k: v for k, v in draft.state_dict().items() if not k.startswith("layers.")}
    seen = set()
    for i, src in enumerate(grown_layer_sources(old, num_layers)):
        for name, tensor in draft.layers[src].state_dict().items():
            copy_of = src in seen and name.rsplit(".", 1)[0] in ZEROED
            state[f"layers.{i}.{name}"] = torch.zeros_like(tensor) if copy_of else tensor.clone()
        seen.add(src)
    grown.load_state_dict(state)
    if draft.draft_vocab is not None:
        grown.set_draft_vocab(draft.draft_vocab)
    return grown.train(draft.training)
