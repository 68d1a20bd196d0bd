"""Generate the demo corpus (if needed) and serve its media on loopback until interrupted, for trying the demo
from the web UI: ``python -m mllm_pipeline.demo.serve``. It prints the run config to paste into the Launchpad."""

from __future__ import annotations

import sys
import time

import yaml

from mllm_pipeline.demo.config import media_run_config, raw_run_config
from mllm_pipeline.demo.paths import PrintLog, demo_dir, demo_media_served, ensure_demo_corpus
from mllm_pipeline.storage import Storage


def main() -> int:
    storage = Storage()
    ensure_demo_corpus(storage)
    directory = demo_dir(storage)
    print(f"demo corpus in {directory}\n\nraw assets (the demo_pipeline job has this as its default config):\n")
    print(yaml.safe_dump(raw_run_config(directory)))
    print("media assets (shift-click Materialize, paste the ones you select):\n")
    print(yaml.safe_dump(media_run_config()))
    with demo_media_served(storage, PrintLog()):
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
