"""`perpo-jax demo`: the local, CPU-only comparison of the alignment methods, and its base.

    run.py      the demo: base -> sample -> reward -> each method -> eval -> report / export
    recipes.py  its config and the configs of its stages (SFT warm-up, one-shape base stage,
                each method), which run and base both derive
    base.py     the shipped base (`demo --train-base`): training one, finding one, its card
    report.py   host-side numpy: per-example scores, bootstrap gains, the shuffled-image check
    args.py     the demo's command line (imports nothing heavy: `demo --help` answers at once)

This file imports none of them, so `perpo_jax.demo.args` stays light.
"""
