"""`python -m flowjax`: the command line (see `flowjax --help`)."""

from ._cli import main


raise SystemExit(main())
