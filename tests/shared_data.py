"""Where the real public data lies: ../shared/data beside the repository (CI has the same layout)."""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLAME_DIR = SHARED_DATA / "routing_traces" / "flame_moe_290m"
REQUEST_TRACES = SHARED_DATA / "request_traces"
