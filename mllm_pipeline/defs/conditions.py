"""The automation condition of the stages that follow upstream changes (evaluated only while the sensor
``follow_upstream_changes`` runs, which is off by default): materialize when an upstream was updated, never while
it is missing or in progress, and never when a blocking check of an upstream failed."""

import dagster as dg

FOLLOW_UPSTREAM = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
