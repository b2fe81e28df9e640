"""`train.py --sweep KEY=V1,V2 ...`: a grid search, one normal run per trial.

The guide's step 2 (パラメータチューニング: try learning rates 1e-5, 5e-5, 1e-4
and LoRA ranks 8, 16, 32, keep the setting with the best validation loss) as
one command:

    python train.py --data dataset/ --auto --sweep training.learning_rate=1e-5,5e-5,1e-4 --sweep lora.r=8,16,32

    parse_sweeps -> validate_trials -> prepare_sweep_dir -> run each trial -> rank -> report

- The grid is the cartesian product of the `--sweep` flags, in the order given.
- Every trial is `autotune.pipeline.run()` in this process with the trial's values
  appended to `--set`, writing to `<sweep dir>/<trial name>` (e.g. `lr=1e-05_r=8`).
  Trials run one after another; under `torchrun` each trial uses every process
  (DDP), as a single run would. On several GPUs see the last point.
- One dry run per distinct memory shape: the trials share `plan_cache`, so
  trials that differ only in e.g. the learning rate reuse one measured plan.
- A sweep folder is a folder of its own kind (its marker says `sweep`): a plain
  `--resume` never takes it over, `--overwrite` moves it aside until a trial trains.
- `--resume` continues an interrupted sweep with the settings it started with (its
  `--config` file's values included): a trial whose run finished is not run again (its
  figures and times are read back); a stopped one continues from its newest checkpoint
  with its own plan; a failed one starts over.
- A failing trial (a one-line `AutotuneError` such as "no plan fits", any other
  exception, or a non-finite final loss) is recorded with its reason, ranked
  last, and the sweep goes on. Ctrl-C stops the sweep after writing
  `sweep.json` with what is done.
- Ranking: by the scores of the trials' saved adapters when every trial that
  succeeded has them (error rate, else speaker similarity), else by validation loss,
  else by train loss; failed trials last. The table and `ranked_by` say which.
- Exit code: 0 when at least one trial finished, 1 when every trial failed,
  2 for a usage error (nothing is trained).
- Output: a ranked table, the winner's `--set` flags ready to paste, and
  `<sweep dir>/sweep.json` (`trials` ranked, `best`, `best_sets`); `--json`
  prints that object on stdout (everything else goes to stderr).
- Several GPUs: when the sweep is one process (not under `torchrun`) and the
  probe sees several GPUs of the first GPU's kind, trials run that many at a
  time, one per GPU: each is `python -m autotune.commands.train <its flags>` in a child process
  with `CUDA_VISIBLE_DEVICES=<that GPU's uuid>`, its output in
  `<trial folder>/console.log` (in `<sweep dir>/.logs/<trial>.log` while it
  runs); the sweep's console shows one line per start and finish. With
  `--auto`, each memory shape is dry-run once, in `<sweep dir>/.dry-runs/<n>/`
  (`--dry-run`, on a free GPU), and the trials of that shape train
  with its plan (`train.py --plan <dry run>/shape.json`, without `--auto`), so
  an out-of-memory error mid-trial can still step down the ladder. `sweep.json` records each
  trial's `gpu`, `started_at`, `finished_at` and `dry_run`, and the dry runs.
  On `--resume` a dry run whose shape and GPU are unchanged is reused. Ctrl-C
  (or SIGTERM) is passed on to the running trials, which save a checkpoint and
  stop; the sweep then writes `sweep.json` and exits 130 (143).
  `--dry-run`, `--check-data`, `--merge` and `--resume CHECKPOINT`
  are refused with `--sweep` (one line, exit 2).
- Several trials on one GPU (`--trials-per-gpu`, `pool.py`): `auto` (the default) runs
  the trials of a memory shape k at a time on a GPU when its dry run measured a peak that
  stays under `autotune.memory_fraction` of 1/k of the card less a CUDA context per child;
  `N` runs N at a time and dry-runs for that share. A child that shares its GPU gets
  `--vram-limit` of its share (and plans as a card of that size); a dry run under `auto`
  has its GPU to itself. One GPU that takes one trial at a time runs them in this process.
  `sweep.json` records `trials_per_gpu`, `most_at_once` per GPU, each dry run's
  `peak_bytes` and `trials_per_gpu`, and the sweep's `trials_per_hour` and `wall_seconds`.

The package: `grid.py` (the grid, the trials' records, ranking and the table),
`local.py` (the sweep folder, trials in this process, the driver `run_sweep`),
`pool.py` (trials as child processes, one or more per GPU), `children.py` (a child's
command, environment and console) and `sharing.py` (how many trials a GPU holds).
"""
