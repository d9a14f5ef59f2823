"""`python -m api [--host H] [--port P]`: serve the REST API with uvicorn, where the
`APISettings` block (else the embedded defaults, 127.0.0.1:8000) says."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from api.logs import uvicorn_log_config
    from blocks.api_settings import resolve_api_settings

    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__)
    parser.add_argument("--host", help="default: the APISettings block's host")
    parser.add_argument("--port", type=int, help="default: the APISettings block's port")
    args = parser.parse_args(argv)
    settings = resolve_api_settings()
    uvicorn.run("api.app:create_app", factory=True, host=args.host or settings.host,
                port=args.port or settings.port, log_config=uvicorn_log_config(),
                access_log=False)


if __name__ == "__main__":
    main()
