"""`draftopd train --config CFG.yaml [key=value ...] [--resume]`."""

import argparse


def cmd_train(args) -> None:
    from draftopd.training import parallel
    from draftopd.training.config import load_config
    from draftopd.training.trainer import train

    cfg = load_config(args.config, args.overrides)
    res = train(cfg, resume=args.resume)
    if not parallel.init().is_main:  # the context train() set up; one summary line per job
        return
    held = f" | held-out offline tau {res.heldout['tau']:.3f}" if res.heldout else ""
    print(f"{cfg.method}: {res.steps} steps ({res.skipped_steps} skipped){held} | drafter: {res.final_drafter} "
          f"| metrics: {res.out_dir / 'metrics.jsonl'}")


def register(sub) -> None:
    s = sub.add_parser(
        "train", help="train a drafter: method sft (DFlash recipe) or opd (Draft-OPD)",
        description="Train a drafter from a YAML config; any field can be overridden as key.sub=value "
                    "(e.g. optim.lr=3e-4 max_steps=100). Checkpoints go to OUT_DIR/checkpoints (atomic), the "
                    "final drafter to OUT_DIR/final (reference DFlash format), metrics to OUT_DIR/metrics.jsonl.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", required=True, help="YAML file, e.g. configs/sft-smollm2.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    s.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/latest exactly")
    s.set_defaults(func=cmd_train)
