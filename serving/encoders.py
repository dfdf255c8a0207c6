"""Query texts -> vectors: Triton's ``query_encoder`` ensemble over gRPC, in-process ONNX Runtime
on the store's exported model, and :class:`QueryEncoding`, the ``triton_fallback`` policy
between them (shared by the QueryEncoder deployment and the colocated Ingress)."""

import asyncio
import time

import numpy as np

from kuberank.errors import KuberankError
from kuberank.onnx_encoder import OnnxEncoder, tokenize
from kuberank.serving.admission import Overloaded
from kuberank.serving.batching import run_on_loop
from kuberank.serving.settings import Settings, onnx_thread_count
from kuberank.store import ENCODER_FILE, INT8_FILE, ONNX_DIR, ModelStore


class EncoderUnavailableError(KuberankError):
    """Triton failed and the fallback is off."""


class InProcessEncoder:
    """ONNX Runtime on the store's exported model, without progress bars (hot path). Safe to
    call from several threads at once (the tokenizer and the session are)."""

    def __init__(self, store: str, manifest: dict, precision: str = "int8", threads: int = 1):
        onnx_dir = ModelStore(store).local(ONNX_DIR)
        name = INT8_FILE if precision == "int8" else ENCODER_FILE
        self.encoder = OnnxEncoder(
            onnx_dir / name,
            tokenizer=onnx_dir / "tokenizer.json",
            max_length=int(manifest["embedding"]["max_length"]),
            intra_op_threads=threads,
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        ids, mask = tokenize(self.encoder.tokenizer, texts)
        return np.asarray(self.encoder._run(ids, mask), dtype=np.float32)


class TritonEncoder:
    """The ``query_encoder`` ensemble over gRPC; one aio client (one channel) per replica."""

    def __init__(
        self,
        url: str,
        model: str = "query_encoder",
        timeout_s: float = 2.0,
        queue_timeout_us: int | None = None,
    ):
        self.url, self.model, self.timeout_s = url, model, timeout_s
        # Triton rejects a request still queued after this long (its queue policy, with
        # allow_timeout_override): the latency budget; None = the model's default
        self.queue_timeout_us = queue_timeout_us
        self._client = None

    def _get_client(self):
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient  # local: heavy, the Triton path only

            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    async def encode(self, texts: list[str]) -> np.ndarray:
        import tritonclient.grpc.aio as grpcclient

        client = self._get_client()
        data = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
        text = grpcclient.InferInput("TEXT", list(data.shape), "BYTES")
        text.set_data_from_numpy(data)
        result = await asyncio.wait_for(
            client.infer(
                self.model,
                [text],
                outputs=[grpcclient.InferRequestedOutput("EMBEDDING")],
                client_timeout=self.timeout_s,
                timeout=self.queue_timeout_us,
            ),
            self.timeout_s + 0.5,
        )
        return np.asarray(result.as_numpy("EMBEDDING"), dtype=np.float32)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.close()
            except Exception:
                pass


def _triton_queue_timeout(exc: Exception) -> bool:
    """Triton rejected the request because it waited past the model's queue timeout
    (``default_queue_policy``): the server works, it is busy."""
    return "timeout expired" in str(exc).lower()


class QueryEncoding:
    """Query texts -> vectors for one replica: Triton (when configured and not failed within
    ``triton_retry_s``) or in-process ONNX Runtime, with the ``triton_fallback`` policy. Shared by
    the QueryEncoder deployment and the colocated Ingress. ``streams``: batches the replica
    encodes at once (the in-process encoder's cores are shared among them)."""

    def __init__(self, triton_url: str, settings: Settings, streams: int = 1):
        self.settings, self.streams = settings, streams
        self.triton = (
            TritonEncoder(
                triton_url,
                settings.triton_model,
                settings.triton_timeout_s,
                int(settings.latency_budget_ms * 1000) if settings.admission else None,
            )
            if triton_url
            else None
        )
        self.triton_down_until = 0.0

    def needs_local(self) -> bool:
        return self.triton is None or self.settings.triton_fallback == "onnx"

    def load_local(self, store: str, manifest: dict) -> "InProcessEncoder | None":
        if not self.needs_local():
            return None
        return InProcessEncoder(store, manifest, self.settings.onnx_precision, self.onnx_threads())

    def onnx_threads(self) -> int:
        return onnx_thread_count(self.settings.onnx_threads, self.streams)

    async def remote(self, texts: list[str]) -> np.ndarray | None:
        """Triton's vectors, or None: encode in process (no Triton, or it failed and the
        fallback is on). Raises EncoderUnavailableError when it failed and the fallback is off."""
        if self.triton is None:
            return None
        if time.monotonic() >= self.triton_down_until:
            try:
                return await self.triton.encode(texts)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # this request was cancelled, not the call
                # another batch's failure closed the channel under this call
                failure: Exception = ConnectionError("channel closed during the call")
            except Exception as exc:
                if _triton_queue_timeout(exc):  # Triton shed it (its queue policy): not a fault
                    budget = self.settings.latency_budget_ms / 1000.0
                    raise Overloaded("expired", budget, budget) from None
                failure = exc
            try:
                # marked down before the channel is closed: no batch opens a new one meanwhile
                return self.after_failure(failure)
            finally:
                await self.triton.close()
        return self.after_failure(None)

    def remote_from_thread(
        self, texts: list[str], loop: asyncio.AbstractEventLoop
    ) -> np.ndarray | None:
        """:meth:`remote` from a batch worker thread: the gRPC client lives on ``loop``; a
        call the loop does not finish in time counts as a Triton failure."""
        timeout = self.settings.triton_timeout_s + 1
        try:
            return run_on_loop(self.remote(texts), loop, timeout)
        except TimeoutError:
            return self.after_failure(TimeoutError(f"no answer within {timeout}s"))

    def after_failure(self, exc: Exception | None) -> None:
        """After a Triton failure (``exc``; None: one within ``triton_retry_s``): skip Triton
        for ``triton_retry_s``, then None (encode in process), or raise EncoderUnavailableError
        when the fallback is off."""
        if exc is not None:
            self.triton_down_until = time.monotonic() + self.settings.triton_retry_s
        if self.settings.triton_fallback != "onnx":
            problem = f": {exc}" if exc is not None else " failed recently"
            raise EncoderUnavailableError(f"Triton at {self.triton.url}{problem}")
        return None
