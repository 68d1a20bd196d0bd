"""The project's Definitions, as the automation tests use them (jobs, schedules and sensors are all in it)."""

from __future__ import annotations

import dagster as dg


def definitions_with_automation() -> dg.Definitions:
    from mllm_pipeline.definitions import defs

    return defs
