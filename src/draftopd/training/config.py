"""Typed training configuration: YAML file + `key.sub=value` overrides, validated by pydantic.

An unknown key or a wrong type is an error naming the key; nothing is silently ignored.
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from draftopd.errors import DraftOPDError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DraftConfig(Strict):
    init: str | None = Field(None, description="start from this drafter directory (ours or a published DFlash one)")
    num_layers: int | None = Field(None, ge=1, description=(
        "layers of a new drafter (default 1); with init, grow that drafter to this many: each new layer starts "
        "as a no-op copy of the one before it (model.grow), so training starts from init's acceptance"))
    block_size: int = Field(16, ge=2)
    target_layer_ids: list[int] | None = None
    mask_token_id: int | None = None

    @property
    def new_drafter_layers(self) -> int:
        return self.num_layers or 1


class DataConfig(Strict):
    rollouts: str | list[str] = Field(..., min_length=1, description=(
        "rollout directory written by `draftopd rollout` (or write_rollouts), or a list of them trained on "
        "together; each keeps its own held-out share, so adding a directory never moves a held-out rollout "
        "into training"))
    max_length: int = Field(1024, ge=8, description="truncate prompt+response to this many tokens")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="hold out this share of rollouts for offline tau")

    @property
    def rollout_dirs(self) -> list[str]:
        return [self.rollouts] if isinstance(self.rollouts, str) else list(self.rollouts)

    @model_validator(mode="after")
    def _each_directory_once(self):
        seen = {}
        for d in self.rollout_dirs:
            key = Path(d).resolve()
            if key in seen:
                raise ValueError(f"rollout directory {d!r} is listed twice (as {seen[key]!r}); "
                                 "list each directory once")
            seen[key] = d
        return self


class OptimConfig(Strict):
    lr: float = Field(6e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = Field(0.04, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)


class SFTConfig(Strict):
    num_anchors: int = Field(512, ge=1, description="random anchors per sequence (DFlash: 512)")
    gamma: float = Field(7.0, gt=0, description="offset weight exp(-(k-1)/gamma) (DFlash: 7 for B=16)")
    cache_features: bool = Field(True, description="compute target features once per rollout, keep them (bf16)")


class OPDConfig(Strict):
    loss: Literal["exact", "sampled"] = Field(
        "exact", description="exact: the paper's full-vocabulary KL (forward on accepted offsets, gamma^(k-1)-"
        "weighted reverse on rejected ones); sampled: the public code's estimators (Bernoulli forward KL on each "
        "committed token, k3 reverse on each rejected draft, one pooled weighted mean)")
    gamma: float = Field(0.8, gt=0, description="rejected-offset weight gamma^(k-1)")
    lambda_acc: float = Field(1.0, ge=0, description="forward-stream weight (sampled: the code's response stream)")
    lambda_rej: float = Field(1.0, ge=0, description="rejected-stream weight")
    teacher_temperature: float = Field(1.0, gt=0)
    logprob_clamp: float = Field(-10.0, description="sampled loss: floor on the forward term's log-probs")
    correction_forward: bool | None = Field(
        None, description="also give the committed correction token (the target's, at the first rejected "
        "offset) a forward term; None = each loss's published choice: exact off (paper), sampled on (code)")
    ablation: Literal["none", "all_forward", "all_reverse", "no_decay", "random_anchors",
                      "random_anchors_all"] = Field(
        "none", description="random_anchors: forward segments at random anchors, rejected stream on-policy (the "
        "public code's); random_anchors_all: every block at a uniformly random anchor")
    rollout_mode: Literal["cached", "live"] = "cached"
    refresh_every: int = Field(50, ge=1, description="live mode: regenerate rollouts every N updates")
    live_temperature: float = Field(0.0, ge=0, description="live mode: decoding temperature")
    live_max_new_tokens: int = Field(256, ge=1)
    max_anchors: int = Field(128, ge=1, description="cap on on-policy anchors per sequence per step")
    offset_sampling: bool = Field(False, description="exact loss: score rejected offset k > r with probability "
                                  "gamma^(k-1-r), weighted back (same expected loss; fewer verify/KL rows)")

    @model_validator(mode="after")
    def _check(self):
        if self.offset_sampling and (self.loss != "exact" or self.ablation == "no_decay" or self.gamma >= 1):
            raise ValueError("offset_sampling samples the gamma^(k-1) decay of the exact loss: it needs "
                             "loss=exact, gamma < 1 and no no_decay ablation")
        if self.ablation in ("all_forward", "all_reverse") and (self.loss != "exact" or self.correction_forward):
            raise ValueError(f"ablation={self.ablation} sets the KL direction of every exact-loss term: it needs "
                             "loss=exact and no correction_forward")
        return self


class LogConfig(Strict):
    every: int = Field(10, ge=1, description="log metrics every N optimizer steps")
    save_every: int = Field(200, ge=1)
    keep_last: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="offline tau on held-out rollouts every N steps (0 = end only)")
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "draftopd"
    progress: bool = True


class TrainConfig(Strict):
    method: Literal["sft", "opd"]
    target: str = "smollm2-135m"
    target_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on CUDA and on CPUs with fast bf16, else fp32")
    out_dir: str = "runs/train"
    seed: int = 0
    device: str = "cpu"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    max_minutes: float | None = Field(None, gt=0, description="stop (and save) after this much time on budget_clock")
    budget_clock: Literal["wall", "cpu"] = Field(
        "wall", description="what max_minutes counts: wall time, or this process's CPU time (all threads), which "
                            "other jobs on a shared CPU do not eat into: equal-compute comparisons")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1)
    bf16: bool = Field(False, description="bf16 autocast for the drafter")
    final_dtype: Literal["bf16", "fp32"] = Field("bf16", description="dtype of OUT_DIR/final (published drafters "
                                                  "are bf16); checkpoints keep the fp32 training weights")
    gradient_checkpointing: bool = False
    draft: DraftConfig = DraftConfig()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    sft: SFTConfig = SFTConfig()
    opd: OPDConfig = OPDConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.draft.init is None and self.method == "opd":
            raise ValueError("draft.init: OPD starts from a trained drafter (an SFT checkpoint or a DFlash one)")
        return self


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise DraftOPDError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Read YAML, apply `a.b=value` overrides (values parsed as YAML), validate."""
    tree = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise DraftOPDError(f"config {path}: no such file")
        try:
            tree.update(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError as e:
            raise DraftOPDError(f"config {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise DraftOPDError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), yaml.safe_load(raw))
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "config"
        got = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise DraftOPDError(f"{path or 'config'}: {where}: {msg}{got}") from None
