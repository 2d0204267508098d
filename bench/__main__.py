"""``python -m bench``: run the whole benchmark and print the table last."""

from bench import harness

raise SystemExit(harness.main())
