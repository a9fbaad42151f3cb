"""The training loop shared by SFT and Draft-OPD: thin, with the math in sft.py / opd.py.

Resume is exact: batches and anchors are pure functions of (seed, micro-batch index), the
learning rate a function of the step, and the optimizer state comes from the last atomic
checkpoint. (Wall-time-budgeted runs schedule by time spent, which no resume can replay.)
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from draftopd.data.rollouts import load_rollouts
from draftopd.errors import DraftOPDError
from draftopd.io import check_output_dir, holds, write_json_atomic
from draftopd.model.checkpoint import drafter_target_name, init_drafter, load_drafter
from draftopd.model.grow import grow_drafter
from draftopd.model.drafter import DFlashDraftModel
from draftopd.model.precision import hardware_record, parse_dtype
from draftopd.model.target import Target, load_target
from draftopd.seeds import stream
from draftopd.training import parallel
from draftopd.training.batches import BatchPlan, training_split
from draftopd.training.checkpointing import export_drafter, latest_checkpoint, load_trainer_state, save_checkpoint
from draftopd.training.config import TrainConfig
from draftopd.training.losses import implied_tau
from draftopd.training.metrics_log import MetricsLog
from draftopd.training.onpolicy import offline_tau
from draftopd.training.opd import OPDStep, rollout_temperature
from draftopd.training.sft import SFTStep
from draftopd.training.step import Step, StepStats


@dataclass
class TrainResult:
    out_dir: Path
    final_drafter: Path
    steps: int
    skipped_steps: int
    heldout: dict | None


def lr_factor(progress: float, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup then cosine decay to min_ratio, over training progress in [0, 1]."""
    if progress < warmup_ratio:
        return max(progress / warmup_ratio, 1e-3)
    t = (progress - warmup_ratio) / max(1e-9, 1 - warmup_ratio)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class Schedule:
    """Learning rate by progress: steps done / total, or, for a time budget (`max_minutes`
    without `max_steps`), the larger of that and the share of time spent on `budget_clock`."""

    def __init__(self, opt, cfg: TrainConfig, total: int, elapsed_s: float = 0.0):
        self.opt, self.cfg, self.total = opt, cfg, total
        self.budget_s = cfg.max_minutes * 60 if cfg.max_minutes and not cfg.max_steps else None
        self.clock = time.process_time if cfg.budget_clock == "cpu" else time.time
        self.t0 = self.clock() - elapsed_s
        self.base = [cfg.optim.lr for _ in opt.param_groups]

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def set(self, step: int) -> float:
        progress = step / self.total
        if self.budget_s:
            progress = max(progress, self.elapsed() / self.budget_s)
        f = lr_factor(progress, self.cfg.optim.warmup_ratio, self.cfg.optim.min_lr_ratio)
        for g, base in zip(self.opt.param_groups, self.base):
            g["lr"] = base * f
        return self.opt.param_groups[0]["lr"]


class Accumulator:
    """Averages scalars and sums per-offset (numerator, denominator) vectors between log lines."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.n, self.vectors = {}, 0, {}
        self.tokens = self.anchors = 0
        self.t0 = time.time()

    def add(self, loss: float, stats: StepStats, tokens: int):
        self.n += 1
        for k, v in {"loss": loss, **stats.scalars}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        for k, (num, den) in stats.vectors.items():
            old = self.vectors.get(k)
            self.vectors[k] = (num, den) if old is None else (old[0] + num, old[1] + den)
        self.tokens += tokens
        self.anchors += stats.blocks

    def summary(self) -> dict:
        dt = max(time.time() - self.t0, 1e-9)
        rec = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        for k, (num, den) in self.vectors.items():
            rec[k] = [round(x, 4) for x in (num.float() / den.clamp(min=1).float()).tolist()]
        if "acc_per_offset" in rec:
            rec["tau_implied"] = implied_tau(rec["acc_per_offset"])
        rec["tokens_per_s"] = self.tokens / dt
        rec["anchors_per_s"] = self.anchors / dt
        return rec


def build_step(cfg: TrainConfig, draft: DFlashDraftModel, target: Target, ctx: parallel.Context,
               rollout_meta: dict | None = None) -> Step:
    """The per-micro-batch step of the configured method; the steps take the bare HF model."""
    if cfg.method == "sft":
        return SFTStep(cfg, draft, target.model)
    return OPDStep(cfg, draft, target.model, ctx, rollout_meta)


def _prepare_drafter(cfg: TrainConfig, target: Target, resume_from: Path | None) -> DFlashDraftModel:
    if resume_from is not None:
        draft = load_drafter(resume_from / "drafter", device=cfg.device)
    elif cfg.draft.init:
        draft = load_drafter(cfg.draft.init, device=cfg.device)
        if cfg.draft.num_layers:
            draft = grow_drafter(draft, cfg.draft.num_layers)
    else:
        draft = init_drafter(target, num_layers=cfg.draft.new_drafter_layers, block_size=cfg.draft.block_size,
                             target_layer_ids=cfg.draft.target_layer_ids, mask_token_id=cfg.draft.mask_token_id,
                             seed=cfg.seed).to(cfg.device)
    if draft.block_size != cfg.draft.block_size:
        raise DraftOPDError(f"block size mismatch: drafter {cfg.draft.init or resume_from} has block_size "
                            f"{draft.block_size}, config draft.block_size is {cfg.draft.block_size}")
    draft.check_target(target.model)
    recorded = drafter_target_name(draft)
    if recorded and recorded != target.name:
        raise DraftOPDError(f"drafter was built for target {recorded!r}, not {target.name!r}")
    return draft.float().train()


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    ctx = parallel.init()
    out = Path(cfg.out_dir)
    ckpt = latest_checkpoint(out)
    if resume and ckpt is None:
        raise DraftOPDError(f"nothing to resume: {out}/checkpoints has no checkpoint")
    if not resume and ckpt is not None:
        raise DraftOPDError(f"{out} already has checkpoints; pass --resume to continue or choose another out_dir")
    check_output_dir(out, kind="training run", is_kind=holds("config.json"), resume=True)  # resume: checked above
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    target = load_target(cfg.target, dtype=cfg.target_dtype, device=cfg.device)
    loaded = {d: load_rollouts(d, expect_target=target.identity) for d in cfg.data.rollout_dirs}
    train_seqs, held = training_split({d: rollouts for d, (_, rollouts) in loaded.items()}, cfg.data.max_length,
                                      cfg.data.eval_fraction, cfg.seed)
    meta = max((m for m, _ in loaded.values()), key=rollout_temperature)  # the step warns about the hottest set
    draft = _prepare_drafter(cfg, target, ckpt if resume else None)
    if cfg.gradient_checkpointing:
        draft.gradient_checkpointing_enable()
    model = parallel.wrap(draft, ctx, bf16=cfg.bf16)

    plan = BatchPlan(train_seqs, cfg.batch_size, cfg.seed, ctx.rank, ctx.world)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * plan.per_epoch / cfg.grad_accum))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    elapsed = 0.0
    start, skipped = 0, 0
    if resume:
        state = load_trainer_state(ckpt, model, opt)
        start, skipped, elapsed = state["step"], state.get("skipped_steps", 0), state.get("elapsed_s", 0.0)
    sched = Schedule(opt, cfg, total, elapsed)
    if ctx.is_main:
        write_json_atomic(out / "config.json", cfg.model_dump())
    log = MetricsLog(out, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb, project=cfg.log.wandb_project,
                     config=cfg.model_dump(), resume_step=start, enabled=ctx.is_main)
    step_fn = build_step(cfg, model, target, ctx, meta)
    acc = Accumulator()
    bar = tqdm(total=None if sched.budget_s else total, initial=start, desc=f"{cfg.method} train", disable=not (cfg.log.progress and ctx.is_main),
               dynamic_ncols=True)
    autocast = torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16)
    step = start
    try:
        while step < total:
            lr = sched.set(step)
            for micro in range(cfg.grad_accum):
                i = step * cfg.grad_accum + micro
                batch = plan.micro_batch(i)
                gen = stream(cfg.seed, "micro-batch", i * ctx.world + ctx.rank)
                parallel.sync_gradients(model, ctx, enabled=micro == cfg.grad_accum - 1)
                with autocast:
                    loss, stats = step_fn(batch, gen)
                    (loss / cfg.grad_accum).backward()
                loss_value = parallel.mean_over_ranks(float(loss.detach()), ctx)
                if math.isfinite(loss_value):
                    acc.add(loss_value, stats, batch.num_tokens * ctx.world)
            grads_ok = parallel.all_finite(model, ctx)
            if grads_ok:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                opt.step()
            else:
                skipped += 1
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.log.every == 0 or step == total:
                rec = acc.summary()
                rec.update(lr=lr, skipped_steps=skipped)
                log.log(step, rec)
                bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.3f}",
                                tau=f"{rec.get('tau_prefix', rec.get('tau_walk', 0)):.2f}")
                acc.reset()
            if cfg.log.eval_every and step % cfg.log.eval_every == 0 and held:
                with parallel.gathered(model, ctx):
                    if ctx.is_main:
                        log.log(step, {"heldout_tau": offline_tau(model.eval(), target.model, held)["tau"]})
                model.train()
            timed_out = cfg.max_minutes is not None and sched.elapsed() / 60 >= cfg.max_minutes
            if step % cfg.log.save_every == 0 or step == total or timed_out:
                save_checkpoint(out, step, model, opt, {"skipped_steps": skipped, "elapsed_s": sched.elapsed()}, ctx,
                                cfg.log.keep_last)
            if timed_out:
                break
    finally:
        bar.close()
    heldout = None
    final = out / "final"
    export_drafter(model, final, ctx, dtype=parse_dtype(cfg.final_dtype))
    if ctx.is_main:
        if held:
            heldout = offline_tau(load_drafter(final, device=cfg.device), target.model, held)
            log.log(step, {"heldout_tau": heldout["tau"]})
        write_json_atomic(out / "summary.json", {"steps": step, "skipped_steps": skipped, "heldout": heldout,
                                                  "final_drafter": str(final), "elapsed_s": sched.elapsed(),
                                                  "budget_clock": cfg.budget_clock,
                                                  "hardware": hardware_record(target.dtype, target.device)})
    log.close()
    parallel.barrier(ctx)
    return TrainResult(out, final, step, skipped, heldout)
