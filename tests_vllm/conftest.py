"""Tests of ``acttransport serve`` (vLLM). They run in .venv-vllm (``make vllm-env``), apart from
the main suite whose environment has no vLLM: ``make test`` runs ``.venv-vllm/bin/python -m pytest tests_vllm``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
