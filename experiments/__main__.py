"""`python -m experiments NAME ...` and `python -m experiments --list`."""

from ._registry import main


raise SystemExit(main())
