"""Dagster wiring only: assets, checks, jobs and resources. The work itself lives in the domain packages."""
