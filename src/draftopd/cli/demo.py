"""`draftopd demo`: the whole pipeline on the embedded target, in about ten minutes on 2 CPU cores."""


def cmd_demo(args) -> None:
    from draftopd.demo import DemoPlan, run_demo

    run_demo(DemoPlan(out_dir=args.out, sft_minutes=args.sft_minutes, opd_minutes=args.opd_minutes,
                      eval_samples=args.eval_samples, seed=args.seed))


def register(sub) -> None:
    s = sub.add_parser(
        "demo", help="rollouts -> SFT -> Draft-OPD -> evaluation on the embedded SmolLM2-135M",
        description="Runs the full pipeline on the embedded target and prints tau and speedup of the untrained, "
                    "SFT and Draft-OPD drafters side by side. Interrupt it any time; rerun to resume.")
    s.add_argument("--out", default="runs/demo", help="working directory (default %(default)s)")
    s.add_argument("--sft-minutes", type=float, default=3.0, help="SFT wall time (default %(default)s)")
    s.add_argument("--opd-minutes", type=float, default=1.5, help="Draft-OPD wall time (default %(default)s)")
    s.add_argument("--eval-samples", type=int, default=1, help="held-out prompts per benchmark (default %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_demo)
