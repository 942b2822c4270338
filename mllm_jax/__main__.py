"""``python -m mllm_jax``: see ``mllm_jax/cli.py``."""
import sys

from mllm_jax.cli import main

sys.exit(main())
