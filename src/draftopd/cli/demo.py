"""`draftopd demo`: the paper's recipe at toy scale on the embedded target, in about ten minutes on 2 CPU cores."""

from draftopd.cli import DTYPE_CHOICES, DTYPE_HELP
from draftopd.demo import PHASE_MINUTES


def cmd_demo(args) -> None:
    from draftopd.demo import DemoPlan, run_demo

    plan = DemoPlan(out_dir=args.out, from_scratch=args.from_scratch, dtype=args.dtype, seed=args.seed)
    for phase in plan.budget_minutes:
        value = getattr(args, f"{phase}_minutes")
        if value is not None:
            plan.budget_minutes[phase] = value
    run_demo(plan)


def register(sub) -> None:
    s = sub.add_parser(
        "demo", help="Draft-OPD post-training of the shipped drafter on the embedded SmolLM2-135M, then evaluation",
        description="Makes fresh greedy rollouts of the embedded target, post-trains the shipped SFT drafter "
                    "(smollm2-135m-dflash) by Draft-OPD for a few minutes, and prints target alone, shipped drafter "
                    "and Draft-OPD drafter side by side: tau, speedup, the tau ratio with a bootstrap interval, "
                    "and the lossless check. Each phase has a wall-time budget sized to this machine. "
                    "Interrupt it any time; rerun to resume.")
    s.add_argument("--out", default="runs/demo", help="working directory (default %(default)s)")
    s.add_argument("--from-scratch", action="store_true",
                   help="train a new drafter by SFT first instead of starting from the shipped one")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=f"{DTYPE_HELP} (default %(default)s)")
    s.add_argument("--rollouts-minutes", type=float, help=f"rollout budget (default {PHASE_MINUTES['rollouts']})")
    s.add_argument("--sft-minutes", type=float, help=f"SFT budget with --from-scratch (default {PHASE_MINUTES['sft']})")
    s.add_argument("--opd-minutes", type=float, help=f"Draft-OPD budget (default {PHASE_MINUTES['opd']})")
    s.add_argument("--eval-minutes", type=float, help=f"evaluation budget (default {PHASE_MINUTES['eval']})")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_demo)
