"""The automation condition of the stages that follow upstream changes (evaluated only while the sensor
``follow_upstream_changes`` runs, which is off by default): materialize when an upstream was updated, never while
it is missing or in progress, and never when a blocking check of an upstream failed.

The stages that read every shard depend on shard roll-ups (defs/partitions.py), so "updated" means a shard's
committed version changed, at any shard count. A roll-up not observed yet is a stage that has not run (a dataset
not in use): it does not hold the others back. A roll-up is never in progress itself: its stage is, so "in
progress" looks one step further up, past the roll-up to the sharded stage's runs.
"""

import dagster as dg

from mllm_pipeline.defs.partitions import ROLLUP_KEYS

_ROLLUPS = dg.AssetSelection.assets(*ROLLUP_KEYS)

FOLLOW_UPSTREAM = (
    dg.AutomationCondition.eager().replace(
        "any_deps_missing", dg.AutomationCondition.any_deps_missing().ignore(_ROLLUPS))
    & ~dg.AutomationCondition.any_deps_match(dg.AutomationCondition.any_deps_in_progress()).allow(_ROLLUPS)
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
)
