"""A handler served by one real worker with its metrics recorded as /metrics shows them."""

from __future__ import annotations

from pathlib import Path

from api.backends.workers import load_worker_backend
from api.core.types import InferenceRequest, ModelSettings, Prediction
from api.metrics_config import DEFAULT_MODEL_METRICS, MetricsSpec
from api.observability.handler_metrics import HandlerMetrics
from api.observability.metrics import PrometheusObserver
from api.workers.pool import WorkerPool
from tests.support import aio
from tests.support.archives import build_archive


def serve_metered(
    pool: WorkerPool,
    tmp_path: Path,
    name: str,
    handler: str,
    bodies: list[str | bytes],
    *,
    spec: MetricsSpec | None = None,
) -> tuple[list[Prediction], str]:
    """Archive `handler` (handler.py's source) as model `name` and send each body as a request
    of its own to one worker, with `spec` (metrics_config) if given; the answers and the
    /metrics page. The worker must have answered every one (never replaced)."""
    observer = PrometheusObserver(process_metrics=False, hostname="h")
    sink = HandlerMetrics(hostname="h")
    if spec is not None:
        sink.spec = spec
    observer.add_collector(sink)
    observer.add_text(sink.counters_text)
    path = build_archive(tmp_path, name, "handler.py", {"handler.py": handler})

    async def scenario() -> list[Prediction]:
        backend = await load_worker_backend(
            path,
            ModelSettings(batch_size=1),
            pool=pool,
            work_dir=tmp_path / "work",
            on_metric=sink.on_metric,
            declared_metrics=DEFAULT_MODEL_METRICS if spec is None else spec.model_metrics,
        )
        try:
            worker = await backend.start_worker(0)
            answers = []
            for index, body in enumerate(bodies):
                answers += await worker.predict([InferenceRequest({"body": body}, {}, str(index))])
            assert worker.alive
            return answers
        finally:
            await backend.close()

    answers = aio.run(scenario(), timeout=None)
    return answers, observer.render().decode()
