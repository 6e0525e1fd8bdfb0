"""Experiments that check the claims of the flow model (docs/theory.md sec. 5).

Each experiment is a module `experiments.NAME` that runs with one command, writes a
results table (`results.json`) and a figure (`figure.png`), and has three scales:
`tiny` (seconds, for the tests), `small` (a 2-core CPU) and `large` (an
accelerator, same code). See `experiments/README.md` for the measured results.

    python -m experiments --list
    python -m experiments.NAME [--scale tiny|small|large] [--seed S] [--out DIR]
                               [--dry-run]
    flowjax experiment NAME [...]      (from a clone of the repository)
"""

from ._registry import (
    EXPERIMENTS as EXPERIMENTS,
    UsageError as UsageError,
    add_arguments as add_arguments,
    dry_run_experiment as dry_run_experiment,
    list_lines as list_lines,
    load as load,
    main as main,
    run_experiment as run_experiment,
    run_from_args as run_from_args,
)
