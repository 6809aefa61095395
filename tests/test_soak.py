"""A short soak: concurrent clients, cancellations and invalid requests; nothing valid fails."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from soak import soak  # noqa: E402

pytestmark = pytest.mark.slow


def test_quick_soak(demo_text_dir, demo_vision_dirs):
    report = soak(
        clients=6,
        seconds=12,
        max_requests=40,
        max_rss_growth_mb=150,
        model=str(demo_text_dir),
        vision_model=str(demo_vision_dirs["demo:tiny-llava"]),
    )
    assert report["valid_failed"] == 0, report["failures"]
    assert report["invalid_wrong"] == 0, report["failures"]
    assert report["valid_ok"] >= 6 and report["cancelled"] >= 1 and report["invalid_refused"] >= 1, report
    assert report["captions_ok"] >= 1, report
    assert report["passed"], report
