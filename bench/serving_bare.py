"""The ceiling for Python HTTP here (bench/serving.py): a bare FastAPI route answering a constant,
served like our service (api/server.py, 2 workers).

    .venv/bin/python bench/serving_bare.py PORT
"""
import sys
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

app = FastAPI()
ANSWER = b'{"predictions":[0]}'


@app.post("/predict")
async def predict() -> Response:
    return Response(ANSWER, media_type="application/json")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from api.server import serve

    serve("bench.serving_bare:app", port=int(sys.argv[1]), workers=2, log_level="warning")
