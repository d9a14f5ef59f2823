"""`python -m api [--host H] [--port P] [--workers N]`: serve the REST API with uvicorn, where the
`APISettings` block (else the embedded defaults, 127.0.0.1:8000) says.

Every start wipes the Prometheus multiprocess folder (`PROMETHEUS_MULTIPROC_DIR`, default
`<state folder>/api/prometheus`) before the workers start, so /metrics sums the counts of this
run's workers only (api/metrics.py).
"""
from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    from api.logs import uvicorn_log_config
    from api.metrics import MULTIPROC_ENV, prepare_multiprocess_dir
    from api.server import serve
    from blocks.api_settings import resolve_api_settings
    from blocks.mlflow_config import state_dir

    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__)
    parser.add_argument("--host", help="default: the APISettings block's host")
    parser.add_argument("--port", type=int, help="default: the APISettings block's port")
    parser.add_argument("--workers", type=int,
                        default=int(os.environ.get("MLOPS_API_WORKERS", "1")),
                        help="uvicorn worker processes (default: $MLOPS_API_WORKERS, else 1)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    settings = resolve_api_settings()
    prepare_multiprocess_dir(os.environ.get(MULTIPROC_ENV) or state_dir() / "api" / "prometheus")
    serve("api.app:create_app", factory=True, host=args.host or settings.host,
          port=args.port or settings.port, log_config=uvicorn_log_config(),
          access_log=False, workers=args.workers, timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
