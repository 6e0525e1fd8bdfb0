"""`flowjax experiment`: run the experiments that check the flow model's claims.

The experiments live in the `experiments/` folder of a clone of the repository, not
in the installed package. This module finds that folder (next to the `flowjax`
package of an editable install, or in the working directory), puts its parent on
`sys.path` and hands the parsed options to `experiments.run_from_args`. When there is
no such folder, the command says so in one line. `flowjax._cli` picks this module up
through its `EXTENSION_MODULES`.
"""

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from ._cli import Command, UsageError


_NOT_FOUND = (
    "the experiments are not part of the installed flowjax package: they live in "
    "the experiments/ folder of a clone of the repository. Run this command in a "
    "clone (its root as the working directory, or after `pip install -e .` there)"
)


def experiments_root() -> Path | None:
    """The folder that holds `experiments/_registry.py`, or `None`.

    Looked for next to the `flowjax` package (an editable install or a clone on
    `sys.path`), then in the working directory.
    """
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "experiments" / "_registry.py").is_file():
            return root
    return None


def _registry() -> ModuleType:
    root = experiments_root()
    if root is None:
        raise UsageError(_NOT_FOUND)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("experiments")


def _arguments(parser: argparse.ArgumentParser) -> None:
    try:
        registry = _registry()
    except UsageError:
        # Accept the usual options so that running reports the missing folder.
        parser.add_argument("name", nargs="?", metavar="NAME")
        parser.add_argument("--list", action="store_true")
        for option in ("--scale", "--seed", "--out"):
            parser.add_argument(option)
        parser.add_argument("--distributed", action="store_true")
        parser.add_argument("--dry-run", action="store_true")
        return
    registry.add_arguments(parser)


def _run(args: argparse.Namespace) -> int:
    registry = _registry()
    try:
        return registry.run_from_args(args)
    except registry.UsageError as err:
        raise UsageError(str(err)) from None


COMMANDS: dict[str, Command] = {
    "experiment": Command(
        "run one of the experiments that check the flow model's claims "
        "(--list to see them; needs a clone of the repository)",
        _arguments,
        _run,
    ),
}
