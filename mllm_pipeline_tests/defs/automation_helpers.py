"""The project's Definitions with the automation added (without duplicating what definitions.py already has)."""

from __future__ import annotations

import dagster as dg


def definitions_with_automation() -> dg.Definitions:
    from mllm_pipeline.defs.automation import JOBS, SCHEDULES, SENSORS
    from mllm_pipeline.definitions import defs

    repo = defs.get_repository_def()
    have_sensors = {s.name for s in repo.sensor_defs}
    have_schedules = {s.name for s in repo.schedule_defs}
    have_jobs = set(repo.job_names)
    extra = dg.Definitions(
        sensors=[s for s in SENSORS if s.name not in have_sensors],
        schedules=[s for s in SCHEDULES if s.name not in have_schedules],
        jobs=[j for j in JOBS if j.name not in have_jobs],
    )
    return dg.Definitions.merge(defs, extra)
