"""The command lines, as the package installs them: `llasa-train`, `llasa-probe` and
`llasa-synthesize` (console scripts), `python -m autotune.commands.<name>`, and the thin
`train.py`, `probe.py` and `synthesize.py` wrappers at the top of a checkout all run the same
`main` here. Each `entry` turns a user's mistake into one line and exit code 2."""
