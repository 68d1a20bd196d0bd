"""Spark for the downloaders' own ``pyspark`` distributors (img2dataset, video2dataset): no distribution of our own.

With ``distributor="pyspark"`` img2dataset and video2dataset send each of their shards to a Spark task through
the SparkSession that is active in the calling thread (they create a local one only when there is none).
:func:`spark_session` makes that session for ``spark_master`` -- ``local[N]`` (N worker processes on this
machine) or a cluster URL (``spark://host:7077``, ``k8s://https://...``) -- unless one is already active, which is
then used as it is (a notebook's, a test module's).

What runs where: the downloader's reader (splitting the URL list into shards) and the guard proxy run in the
calling process (the Dagster run worker); the downloads, resizing and shard writing run in Spark's Python workers.
Every request still goes through the guard proxy: its ``http_proxy`` variables are handed to the Python workers
through ``SparkContext.environment`` (:func:`executor_env`), so a worker on another machine reaches it at
``proxy_host``. A cluster therefore needs ``proxy_host`` (an address of this machine that the executors can reach)
and ``work_dir`` (a directory mounted at the same path on this machine and on every executor: the downloaders
write their shards there and this process reads them back); :func:`check_spark_options` refuses a cluster
master without them instead of letting every download fail.

This module imports pyspark only when a session is made (pyspark is the ``spark`` extra).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

DISTRIBUTORS = ("multiprocessing", "pyspark")
DEFAULT_MASTER = "local[2]"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_local_master(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def check_spark_options(distributor: str, spark_master: str, proxy_host: str, work_dir: str | None) -> None:
    """Raise ValueError for a combination that cannot work (see the module docstring)."""
    if distributor not in DISTRIBUTORS:
        raise ValueError(f"distributor must be one of {', '.join(DISTRIBUTORS)}, got {distributor!r}")
    if distributor != "pyspark" or is_local_master(spark_master):
        return
    if proxy_host in LOOPBACK_HOSTS:
        raise ValueError(f"spark_master {spark_master!r} runs executors on other machines: set proxy_host to an "
                         "address of this machine that they can reach (the guard proxy listens there)")
    if not work_dir:
        raise ValueError(f"spark_master {spark_master!r} runs executors on other machines: set work_dir to a "
                         "directory mounted at the same path here and on every executor")


@contextlib.contextmanager
def spark_session(master: str = DEFAULT_MASTER, app_name: str = "mllm-pipeline-downloads",
                  conf: dict[str, str] | None = None) -> Iterator[Any]:
    """The active SparkSession if there is one, else a new one for ``master`` (stopped on exit).

    A new session runs its Python workers with this interpreter (``$PYSPARK_PYTHON`` when set): on a cluster
    that path must hold the same environment on every executor (the project's image does)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ImportError("distributor 'pyspark' needs pyspark: pip install 'mllm_pipeline[spark]'") from None

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    old = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = old or sys.executable  # read once, when the SparkContext starts
    try:
        builder = SparkSession.builder.master(master).appName(app_name).config("spark.ui.showConsoleProgress", "false")
        for k, v in (conf or {}).items():
            builder = builder.config(k, v)
        spark = builder.getOrCreate()
    finally:
        if old is None:
            os.environ.pop("PYSPARK_PYTHON", None)
    try:
        yield spark
    finally:
        spark.stop()


@contextlib.contextmanager
def executor_env(spark: Any, env: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the Python workers of the jobs submitted meanwhile (restored on exit)."""
    environment = spark.sparkContext.environment
    old = {k: environment.get(k) for k in env}
    environment.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                environment.pop(k, None)
            else:
                environment[k] = v
