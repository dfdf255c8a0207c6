"""The naive baseline of ``kuberank bench``: one FastAPI/uvicorn process that runs the transformers
model in fp32 (PyTorch) for every request, with no batching, and ranks by exact Q·I over the
store's index. Same request and response shape as the ranking app's ``/search``.

    python -m kuberank.serving.naive_server --model DIR --store STORE --port P   # 127.0.0.1 only
"""

import argparse
import os

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, Field

from kuberank.encoder import TextEncoder
from kuberank.item_index import load_index

HOST = "127.0.0.1"


class NaiveSearch(BaseModel):
    query: str = Field(min_length=1, max_length=512)
    k: int = Field(10, ge=1, le=100)
    user_id: str | None = None
    history: list[str] = Field(default_factory=list)


def make_app(model_dir: str, store: str, max_length: int = 256) -> FastAPI:
    encoder = TextEncoder(model_dir, max_length=max_length)
    index = load_index(store)
    app = FastAPI(title="kuberank naive baseline")

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/search")
    def search(body: NaiveSearch) -> dict:  # sync: uvicorn runs it in its thread pool
        vector = encoder.encode([body.query], desc="query")[0]
        scores = index.embeddings @ vector
        top = np.argsort(-scores, kind="stable")[: body.k]
        return {
            "model_version": "naive",
            "items": [{"id": index.ids[i], "score": float(scores[i])} for i in top],
        }

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn  # local: heavy, only running the server needs it

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args(argv)
    os.environ.setdefault("KUBERANK_PROGRESS", "0")
    app = make_app(args.model, args.store, args.max_length)
    uvicorn.run(app, host=HOST, port=args.port, log_level="warning", workers=1)


if __name__ == "__main__":
    import kuberank  # noqa: F401 - offline model loading before transformers

    main()
