"""The test run's own environment: the Hugging Face caches live in the run's temporary directory."""

from pathlib import Path

import datasets
import huggingface_hub

from tests.conftest import HF_CACHE


def test_hugging_face_caches_are_the_test_runs_own():
    for cache in (datasets.config.HF_DATASETS_CACHE, huggingface_hub.constants.HF_HUB_CACHE):
        assert Path(cache).resolve().is_relative_to(Path(HF_CACHE).resolve()), cache
