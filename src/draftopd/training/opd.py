"""Draft-OPD: train the drafter at the anchors verification exposes, with target feedback.

One micro-batch:
1. target pass over the committed text (features, teacher states, a KV cache);
2. anchors: the on-policy walk with the current drafter (cached mode), the anchors a live
   speculative decode recorded (live mode), or random ones (ablations);
3. drafter replay with grad at those anchors -> q at offsets 1..B-1;
4. teacher p scored on the draft prefix: offsets k <= r+1 from the pass over the text,
   offsets k > r+1 from one batched "verify" pass over the rejected drafts only (packed;
   each sees the text up to its block's first rejection and its own block's earlier
   drafts), reusing the text's KV cache;
5. loss over two streams: forward on the committed offsets (k <= r, and the correction
   k = r+1 with `correction_forward`), gamma^(k-1)-weighted reverse on the rejected ones
   (k > r, inside the text): exact full-vocabulary KL (chunked), or the public code's
   sampled-token estimators.
"""

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PreTrainedModel

from draftopd.decoding.speculative import cache_kwarg, check_full_attention, check_masked_attention, spec_generate
from draftopd.model.drafter import DFlashDraftModel, context_features
from draftopd.model.target import stop_token_ids
from draftopd.seeds import stream
from draftopd.training import parallel
from draftopd.training.anchors import onpolicy_walk, random_anchors, shuffled_segments
from draftopd.training.batches import Batch, Sequence, collate
from draftopd.training.blocks import replay
from draftopd.training.losses import LOGIT_ROWS, kl_rows, offset_weights, sampled_terms
from draftopd.training.onpolicy import candidate_acceptance
from draftopd.training.step import StepStats
from draftopd.training.target_pass import base_model

if TYPE_CHECKING:  # pydantic stays off the import path of the kernels (the GPU check runs without it)
    from draftopd.training.config import TrainConfig


def verify_mask(limit: torch.Tensor, block: torch.Tensor, present: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mask, bool [b, 1, T, n + T], for T packed draft tokens after a cached text of n.

    Token t sees the text before limit[t] and the earlier tokens of its own block (packing
    keeps a block's tokens together, in order). Padding (not present) sees only itself.
    """
    T = block.shape[1]
    text = torch.arange(seq_len, device=limit.device) < limit[..., None]  # [b, T, n]
    own = (block[:, :, None] == block[:, None, :]) & present[:, None, :]
    own &= torch.ones(T, T, dtype=torch.bool, device=block.device).tril()
    own |= torch.eye(T, dtype=torch.bool, device=block.device) & ~present[:, :, None]
    return torch.cat([text & present[..., None], own], dim=-1)[:, None]


@torch.no_grad()
def verify_states(target: PreTrainedModel, cache: DynamicCache, blocks: torch.Tensor, anchors: torch.Tensor,
                  accepted: torch.Tensor, feed: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Target's final hidden after the fed tokens of the drafted blocks: [b, m, w, H].

    blocks [b, m, w] = [x_a, d_1, ..., d_{w-1}]; index i holds p(. | text < a, x_a, d_<=i).
    The accepted prefix x_a, d_1..d_r is committed text whose states the text's KV cache
    already has, so only indices where `feed` [b, m, w] is set (each block's a run starting
    at r+1) are fed, packed per row; the others come back as zeros. The cache grows by the
    packed tokens (one verify per cache). The mask goes in additive (0 / dtype min): eager
    attention adds a boolean mask to the scores as 0/1, which masks nothing.
    """
    check_masked_attention(base_model(target), "OPD's verify pass")
    b, m, w = blocks.shape
    feed = feed.reshape(b, m * w)
    out = torch.zeros(b, m * w, target.config.hidden_size, device=blocks.device)
    T = int(feed.sum(1).max())
    if T == 0:
        return out.view(b, m, w, -1)
    slot = torch.argsort((~feed).to(torch.uint8), dim=1, stable=True)[:, :T]  # fed slots first, in order
    present = feed.gather(1, slot)
    block = slot // w
    positions = (anchors[..., None] + torch.arange(w, device=blocks.device)).view(b, m * w).gather(1, slot)
    limit = (anchors + accepted + 1).gather(1, block)  # text the block's fed tokens see
    model = base_model(target)
    dtype = next(model.parameters()).dtype
    mask = verify_mask(limit, block, present, seq_len)
    mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    h = model(input_ids=blocks.view(b, m * w).gather(1, slot), position_ids=positions, attention_mask=mask,
              **{cache_kwarg(model): cache}, use_cache=True).last_hidden_state
    out.scatter_(1, slot[..., None].expand_as(h), torch.where(present[..., None], h.float(), 0.0))
    return out.view(b, m, w, -1)


def cap_anchors(anchors: list[int], accepted: list[int], cap: int, gen: torch.Generator
                ) -> tuple[list[int], list[int]]:
    """At most `cap` anchors, an unbiased random subset kept in position order."""
    if len(anchors) <= cap:
        return anchors, accepted
    keep = torch.randperm(len(anchors), generator=gen)[:cap].sort().values.tolist()
    return [anchors[k] for k in keep], [accepted[k] for k in keep]


def sample_depth(accepted: torch.Tensor, gamma: float, gen: torch.Generator) -> torch.Tensor:
    """Per block, the last rejected offset to score: P(depth >= k) = gamma^(k-1-r) for k > r.

    The first rejection (k = r+1) is always scored; a kept offset's weight gamma^(k-1)
    divided by its keep probability is gamma^r, so the weighted sum is unbiased.
    accepted [b, m] -> depth [b, m] (an offset, may exceed B-1).
    """
    u = torch.rand(accepted.shape, generator=gen).clamp_min(1e-12).to(accepted.device)
    return accepted + 1 + (u.log() / math.log(gamma)).floor().long()


def combine_kl(kl: torch.Tensor, accepted: torch.Tensor, rejected: torch.Tensor, w_rej: torch.Tensor,
               lambda_acc: float, lambda_rej: float, rej_norm: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict]:
    """The paper's loss over rows: L = (l_acc * L_acc + l_rej * L_rej) / (l_acc + l_rej).

    L_acc = mean KL over accepted rows; L_rej = sum(w * KL) / sum(w) over rejected rows, with
    w = gamma^(k-1) (`rej_norm` replaces sum(w) when the rows are a weighted sample of them).
    A stream with no rows this batch drops out of numerator and denominator.
    """
    parts, lambdas, scalars = [], [], {}
    if accepted.any():
        l_acc = kl[accepted].mean()
        parts.append(lambda_acc * l_acc)
        lambdas.append(lambda_acc)
        scalars["loss_acc"] = float(l_acc.detach())
    if rejected.any():
        w = w_rej[rejected]
        l_rej = (kl[rejected] * w).sum() / (w.sum() if rej_norm is None else rej_norm)
        parts.append(lambda_rej * l_rej)
        lambdas.append(lambda_rej)
        scalars["loss_rej"] = float(l_rej.detach())
    if not parts:
        return kl.sum() * 0, scalars
    return sum(parts) / max(sum(lambdas), 1e-8), scalars


FWD, REJ = 1, 2  # the streams a replayed block is scored in (an on-policy block: both)


def rollout_temperature(meta: dict | None) -> float:
    """The sampling temperature a rollout set was made with (0 when its meta does not say)."""
    return float(((meta or {}).get("settings") or {}).get("temperature") or 0.0)


@dataclass
class LiveRecord:
    """A live speculative decode of one prompt by the drafter of refresh round `refresh`."""

    ids: torch.Tensor  # [n] prompt + response
    prompt_len: int
    anchors: list[int]  # where each verify step drafted
    accepted: list[int]  # r per step (accepted drafts)
    refresh: int


@dataclass
class TextPass:
    """The target's no-grad pass over the committed text of a micro-batch."""

    ids: torch.Tensor  # [b, n]
    lengths: torch.Tensor  # [b]
    cache: DynamicCache  # its KV cache: the verify pass appends the drafted blocks to it
    features: torch.Tensor  # [b, n, F] context features, in the drafter's dtype
    hidden: torch.Tensor  # [b, n, H] final hidden: the teacher's state after each text token


@dataclass
class Blocks:
    """The blocks replayed this micro-batch, padded to m per sequence."""

    anchors: torch.Tensor  # [b, m]
    accepted: torch.Tensor  # [b, m] r: drafts verification accepts at that anchor
    streams: torch.Tensor  # [b, m] FWD | REJ bits; 0 = padding
    plans: list[tuple[list[int], list[int], list[int]]]  # per sequence: anchors, r, streams (unpadded)


@dataclass
class Rows:
    """Which (block, offset) rows each loss stream scores, [b, m, B-1] each, and their weights."""

    accepted: torch.Tensor  # committed drafts: forward stream
    rejected: torch.Tensor  # drafts after the first rejection, inside the text: reverse stream
    correction: torch.Tensor  # the target's own token after a rejection, when it gets a forward term
    w_rej: torch.Tensor  # reverse-stream weight per row: gamma^(k-1), or its offset-sampled version
    rej_norm: torch.Tensor | None  # the reverse stream's weight sum when rows are a weighted sample
    n_rejected: int  # all rejected drafts (the sample may score fewer)


class OPDStep:
    """Callable (batch, generator) -> (loss, stats) for the trainer: the stages of the module docstring.

    `rollout_meta` (the rollout set's meta.json) lets it warn when cached mode is handed
    sampled rollouts: the walk assumes greedy verification, so the anchors it finds on a
    text sampled at temperature > 0 are not the ones a decode of that text exposed.
    """

    def __init__(self, cfg: "TrainConfig", draft: DFlashDraftModel, target: PreTrainedModel,
                 ctx: parallel.Context = parallel.Context(), rollout_meta: dict | None = None):
        self.cfg, self.o, self.draft, self.target, self.ctx = cfg, cfg.opd, draft, target, ctx
        self.live: dict[int, LiveRecord] = {}  # live mode: sequence index -> its latest decode
        self.updates = 0
        self.stop_ids = stop_token_ids(None, target.generation_config)  # live decodes: no tokenizer here
        # the committed correction token's forward term: the paper has none (exact), the public code has one (sampled)
        cf = self.o.correction_forward
        self.correction_forward = self.o.loss == "sampled" if cf is None else cf
        check_masked_attention(base_model(target), "OPD's verify pass")
        check_full_attention(base_model(target), "OPD's verify pass")
        temperature = rollout_temperature(rollout_meta)
        if self.o.rollout_mode == "cached" and temperature > 0:
            warnings.warn(f"opd.rollout_mode=cached on rollouts sampled at temperature {temperature:g}: the greedy "
                          "walk's anchors are not on-policy for sampled text; use temperature-0 rollouts or "
                          "rollout_mode=live", stacklevel=2)

    def __call__(self, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, StepStats]:
        if self.o.rollout_mode == "live":
            with parallel.gathered(self.draft, self.ctx):
                batch = self._refresh_live(batch)
        text = self._text_pass(batch)
        blocks = self._blocks(batch, text, gen)
        hidden = replay(self.draft, self.target.get_input_embeddings(), text.features, text.ids,
                        blocks.anchors)[:, :, 1:]  # [b, m, B-1, H]
        rows = self._rows(blocks, text.lengths, gen)
        text_tok, drafts = self._tokens(text.ids, blocks.anchors, hidden, rows.rejected)
        teacher = self._teacher(text, blocks, drafts, rows.rejected)
        loss, scalars = self._loss(hidden, teacher, rows, text_tok, drafts)
        self.updates += 1
        return loss, self._stats(batch, blocks, rows, scalars)

    # -- 1. the target over the committed text -------------------------------------------------
    def _text_pass(self, batch: Batch) -> TextPass:
        model = base_model(self.target)
        device = next(model.parameters()).device
        ids, lengths = batch.input_ids.to(device), batch.lengths.to(device)
        cache = DynamicCache(config=self.target.config)
        attn = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).long()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True,
                        **{cache_kwarg(model): cache}, use_cache=True)
        feats = context_features(out.hidden_states, self.draft.target_layer_ids)
        return TextPass(ids, lengths, cache, feats.to(next(self.draft.parameters()).dtype), out.last_hidden_state)

    # -- 2. anchors --------------------------------------------------------------------------
    def _blocks(self, batch: Batch, text: TextPass, gen: torch.Generator) -> Blocks:
        if self.o.rollout_mode == "live" and self.o.ablation != "random_anchors_all":
            walks = [(self.live[idx].anchors, self.live[idx].accepted) for idx in batch.indices]
        else:
            was_training = self.draft.training
            self.draft.eval()
            with parallel.gathered(self.draft, self.ctx):
                walks = self._walks(batch, text.features, text.ids, gen)
            self.draft.train(was_training)
        plans = [self._plan(a, r, int(batch.prompt_lens[i]), int(batch.lengths[i]), gen)
                 for i, (a, r) in enumerate(walks)]
        b, device = text.ids.shape[0], text.ids.device
        m = max(1, max(len(p[0]) for p in plans))
        anchors = torch.zeros(b, m, dtype=torch.long, device=device)
        accepted = torch.zeros(b, m, dtype=torch.long, device=device)
        streams = torch.zeros(b, m, dtype=torch.long, device=device)
        for i, (a, r, st) in enumerate(plans):
            if a:
                anchors[i, : len(a)] = torch.tensor(a)
                anchors[i, len(a):] = a[0]  # padding replays a real anchor, scored nowhere
                accepted[i, : len(a)] = torch.tensor(r)
                streams[i, : len(a)] = torch.tensor(st)
            else:
                anchors[i] = batch.prompt_lens[i]
        return Blocks(anchors, accepted, streams, plans)

    def _walks(self, batch, feats, ids, gen) -> list[tuple[list[int], list[int]]]:
        """Per sequence: anchors and accepted drafts r, by the on-policy walk over the text
        (uniformly random anchors for the random_anchors_all ablation)."""
        out = []
        for i in range(ids.shape[0]):
            P, L = int(batch.prompt_lens[i]), int(batch.lengths[i])
            r = candidate_acceptance(self.draft, self.target, feats[i : i + 1], ids[i : i + 1], P, L).tolist()
            if self.o.ablation == "random_anchors_all":
                a, _ = random_anchors(torch.tensor([P]), torch.tensor([L]), self.o.max_anchors, gen)
                a = sorted(set(a[0].tolist())) if L - 1 > P else []
            else:
                a, _ = onpolicy_walk(r, P, L - 1)
            out.append((a, [r[x - P] for x in a]))
        return out

    def _plan(self, anchors: list[int], accepted: list[int], P: int, L: int, gen
              ) -> tuple[list[int], list[int], list[int]]:
        """Blocks to replay for one sequence: anchors, r, streams (FWD | REJ), at most max_anchors per stream.

        random_anchors (the public code's ablation): the forward stream moves to random anchors,
        each block keeping its forward segment (r committed drafts, + the correction with
        `correction_forward`) as its r; the rejected stream stays at the on-policy anchors.
        """
        o, B = self.o, self.draft.block_size
        if o.ablation != "random_anchors":
            a, r = cap_anchors(anchors, accepted, o.max_anchors, gen)
            return a, r, [FWD | REJ] * len(a)
        seg = [min(x + int(self.correction_forward), B - 1, L - 1 - a) for a, x in zip(anchors, accepted)]
        fa, fr = shuffled_segments([s for s in seg if s > 0], P, L - 1, gen)
        fa, fr = cap_anchors(fa, fr, o.max_anchors, gen)
        ra, rr = cap_anchors(anchors, accepted, o.max_anchors, gen)
        return fa + ra, fr + rr, [FWD] * len(fa) + [REJ] * len(ra)

    # -- 3. which offsets each stream scores, with what weight -------------------------------------
    def _rows(self, blocks: Blocks, lengths: torch.Tensor, gen: torch.Generator) -> Rows:
        o, B = self.o, self.draft.block_size
        anchors, r = blocks.anchors, blocks.accepted
        k = torch.arange(1, B, device=anchors.device)  # offsets
        fwd_ok, rej_ok = ((blocks.streams & FWD) > 0)[..., None], ((blocks.streams & REJ) > 0)[..., None]
        in_text = anchors[..., None] + k < lengths[:, None, None]  # a text token sits at a+k
        accepted = (k <= r[..., None]) & fwd_ok  # committed drafts (inside the text by construction)
        rejected = (k > r[..., None]) & rej_ok & in_text  # past the text's end (EOS / cut) nothing was verified
        correction = (k == r[..., None] + 1) & fwd_ok & rej_ok & in_text & self.correction_forward
        n_rejected = int(rejected.sum())
        w_rej = offset_weights(B, o.gamma, "none" if o.ablation == "no_decay" else "pow").to(anchors.device)
        w_rej = w_rej.expand_as(accepted)
        rej_norm = None
        if o.offset_sampling:
            rej_norm = w_rej[rejected].sum()
            depth = sample_depth(r, o.gamma, gen)  # score rejected offsets r < k <= depth
            rejected = rejected & (k[None, None] <= depth[..., None])
            w_rej = (o.gamma ** r.float())[..., None].expand_as(accepted)  # gamma^(k-1) / P(keep k)
        return Rows(accepted, rejected, correction, w_rej, rej_norm, n_rejected)

    # -- 4. tokens: the text's, and the drafter's own after a rejection -----------------------------
    def _tokens(self, ids: torch.Tensor, anchors: torch.Tensor, hidden: torch.Tensor, rejected: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text token at a+k, draft at a+k) [b, m, B-1]: drafts are q's argmax where the text does not fix them."""
        b, m = anchors.shape
        k = torch.arange(1, self.draft.block_size, device=anchors.device)
        text_pos = (anchors[..., None] + k).clamp(max=ids.shape[1] - 1)
        text_tok = ids.gather(1, text_pos.view(b, -1)).view(b, m, -1)
        head = self.draft.draft_head(self.target.get_output_embeddings())  # as decoding drafts
        with torch.no_grad():
            drafts = text_tok.clone()
            rows = rejected.nonzero(as_tuple=True)
            for s in range(0, rows[0].numel(), LOGIT_ROWS):
                sel = tuple(t[s : s + LOGIT_ROWS] for t in rows)
                drafts[sel] = head.greedy(hidden[sel].detach())
        return text_tok, drafts

    # -- 5. the teacher on the draft prefix ----------------------------------------------------
    def _teacher(self, text: TextPass, blocks: Blocks, drafts: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """Target states [b, m, B-1, H]: from the text pass for k <= r+1, from one verify pass beyond."""
        anchors, r = blocks.anchors, blocks.accepted
        (b, m), n, H = anchors.shape, text.ids.shape[1], text.hidden.shape[-1]
        k = torch.arange(1, self.draft.block_size, device=anchors.device)
        from_text = k[None, None] <= r[..., None] + 1
        teacher = text.hidden.gather(1, (anchors[..., None] + k - 1).clamp(max=n - 1).view(b, -1, 1)
                                     .expand(-1, -1, H)).view(b, m, -1, H)
        need = rejected & ~from_text  # offset k's state comes from block index k-1: same layout
        if not need.any():
            return teacher
        block_tokens = torch.cat([text.ids.gather(1, anchors)[..., None], drafts[..., :-1]], dim=-1)  # [b, m, B-1]
        verified = verify_states(self.target, text.cache, block_tokens, anchors, r, need, n)
        return torch.where(from_text[..., None], teacher, verified.to(teacher.dtype))

    # -- 6. the loss -------------------------------------------------------------------------
    def _loss(self, hidden, teacher, rows: Rows, text_tok, drafts) -> tuple[torch.Tensor, dict]:
        o, head = self.o, self.target.get_output_embeddings().weight
        scored = rows.accepted | rows.rejected  # correction rows are rejected rows too
        flat = lambda t: t[scored]  # noqa: E731 -- [N, ...] over scored (block, offset) rows
        if o.loss == "sampled":
            return sampled_terms(
                flat(hidden), flat(teacher), head, targets_fwd=flat(text_tok), use_fwd=flat(rows.accepted | rows.correction),
                targets_rev=flat(drafts), use_rev=flat(rows.rejected), w_rev=flat(rows.w_rej), lambda_fwd=o.lambda_acc,
                lambda_rev=o.lambda_rej, temperature=o.teacher_temperature, floor=o.logprob_clamp)
        forward = rows.accepted.clone()
        if o.ablation == "all_forward":
            forward[:] = True
        elif o.ablation == "all_reverse":
            forward[:] = False
        h, t, fwd, acc, rej, w = (flat(x) for x in (hidden, teacher, forward, rows.accepted, rows.rejected, rows.w_rej))
        if rows.correction.any():  # its forward KL joins the accepted stream; its reverse KL stays in the rejected one
            c = int(rows.correction.sum())
            h, t = torch.cat([h, hidden[rows.correction]]), torch.cat([t, teacher[rows.correction]])
            yes = torch.ones(c, dtype=torch.bool, device=h.device)
            fwd, acc = torch.cat([fwd, yes]), torch.cat([acc, yes])
            rej, w = torch.cat([rej, ~yes]), torch.cat([w, w.new_zeros(c)])
        kl = kl_rows(h, t, head, fwd, o.teacher_temperature)
        return combine_kl(kl, acc, rej, w, o.lambda_acc, o.lambda_rej, rows.rej_norm)

    # -- 7. statistics ------------------------------------------------------------------------
    def _stats(self, batch: Batch, blocks: Blocks, rows: Rows, scalars: dict) -> StepStats:
        """Acceptance from the on-policy blocks (their r is an acceptance; a random block's is not)."""
        k = torch.arange(1, self.draft.block_size, device=blocks.anchors.device)
        walk_lengths = [min(x + 1, int(batch.lengths[i]) - 1 - a) for i, (a_, r_, st) in enumerate(blocks.plans)
                        for a, x, s in zip(a_, r_, st) if s & REJ]
        rej_ok = ((blocks.streams & REJ) > 0)[..., None]
        reached = ((blocks.accepted[..., None] >= k) & rej_ok).sum(dim=(0, 1)).cpu()
        return StepStats(
            scalars={**scalars, "tau_walk": sum(walk_lengths) / max(len(walk_lengths), 1),
                     "accepted_tokens": float(rows.accepted.sum()), "rejected_tokens": float(rows.n_rejected)},
            vectors={"accept_rate_per_offset": (reached, torch.full_like(reached, len(walk_lengths)))},
            blocks=int((blocks.streams > 0).sum()))

    # -- live mode -------------------------------------------------------------------------------
    def _refresh_live(self, batch: Batch) -> Batch:
        """Replace each sequence's text by a speculative decode with the current drafter."""
        refresh = self.updates // self.o.refresh_every
        was_training = self.draft.training
        self.draft.eval()
        seqs = []
        for i, idx in enumerate(batch.indices):
            L, P = int(batch.lengths[i]), int(batch.prompt_lens[i])
            rec = self._live_sequence(idx, batch.input_ids[i, :L], P, refresh)
            seqs.append(Sequence(idx, rec.ids, rec.prompt_len))
        self.draft.train(was_training)
        return collate(seqs)

    def _live_sequence(self, idx: int, ids: torch.Tensor, prompt_len: int, refresh: int) -> LiveRecord:
        rec = self.live.get(idx)
        if rec is None or rec.refresh != refresh:
            res = spec_generate(self.draft, self.target, ids[:prompt_len][None], self.o.live_max_new_tokens,
                                temperature=self.o.live_temperature, stop_token_ids=self.stop_ids,
                                generator=stream(self.cfg.seed, "live decode", idx, refresh))
            lens = res.acceptance_lengths
            anchors = (prompt_len + torch.tensor([0] + lens[:-1]).cumsum(0)).tolist()
            rec = LiveRecord(res.output_ids[0].cpu(), prompt_len, anchors, res.accepted_drafts, refresh)
            self.live[idx] = rec
        return rec
