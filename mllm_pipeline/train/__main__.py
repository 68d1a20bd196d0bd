import sys

from mllm_pipeline.train.cli import main

sys.exit(main())
