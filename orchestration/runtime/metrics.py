"""The one Prometheus metrics registry of a SOHO training worker.

Every worker process owns one :class:`SohoMetrics` and serves it on its own port
(``--metrics-port`` + local rank). Names follow the contract in ARCHITECTURE.md: prefix ``soho_``,
base units, counters end in ``_total``, and every series carries a ``rank`` label so that a
collapsing visual dictionary or a stalled rank shows up per worker in Grafana and in the alert rules
of ``k8s/base/monitoring/``.

The worker loop calls the ``observe_*`` / ``set_*`` methods; nothing here knows about Ray, DeepSpeed
or torch, so the module is cheap to import and to unit-test.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server as _prom_start_http_server

logger = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9450

LOSS_TASKS: tuple[str, ...] = ("mlm", "mvm", "itm", "itc", "total")  # itc only when pretrain.itc_weight > 0
VD_HEALTH_KEYS: tuple[str, ...] = ("usage_ratio", "perplexity", "dead_codes", "decay")
EVAL_DIRECTIONS: tuple[str, ...] = ("t2i", "i2t")

# Metric family names exactly as they are written in PromQL (counters with their ``_total``
# suffix, histograms by their base name). The dashboard/rule tests check every expression against
# this list, so a metric that is renamed here breaks those tests instead of a silent Grafana panel.
METRIC_NAMES: tuple[str, ...] = (
    "soho_train_loss",
    "soho_train_steps_total",
    "soho_train_samples_total",
    "soho_train_step_duration_seconds",
    "soho_data_wait_seconds_total",
    "soho_train_nonfinite_steps_total",
    "soho_vd_perplexity",
    "soho_vd_usage_ratio",
    "soho_vd_dead_codes",
    "soho_vd_ema_decay",
    "soho_vd_num_codes",
    "soho_checkpoint_save_duration_seconds",
    "soho_checkpoint_last_step",
    "soho_checkpoint_last_timestamp_seconds",
    "soho_data_bad_samples_total",
    "soho_eval_recall",
    "soho_eval_itm_accuracy",
    "soho_eval_seconds",
    "soho_run_info",
)

HISTOGRAM_NAMES: tuple[str, ...] = (
    "soho_train_step_duration_seconds",
    "soho_checkpoint_save_duration_seconds",
)

# Training steps range from ~10 ms (tiny preset on CPU) to minutes (base preset, large grad-accum).
STEP_DURATION_BUCKETS: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
# A DeepSpeed checkpoint of the base preset to S3 takes tens of seconds; ZeRO-3 with many ranks, minutes.
CHECKPOINT_DURATION_BUCKETS: tuple[float, ...] = (
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)

# Run-config keys that are safe as labels of soho_run_info: few distinct values per cluster.
INFO_KEYS: tuple[str, ...] = (
    "preset",
    "run_name",
    "precision",
    "zero_stage",
    "num_workers",
    "use_gpu",
    "micro_batch_size",
    "grad_accum",
)


def _check_non_negative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return value


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class SohoMetrics:
    """Prometheus metrics of one training worker (one rank).

    Args:
        rank: global rank of the worker; becomes the ``rank`` label of every series.
        registry: registry to register into; by default a fresh one, so that several workers (or
            tests) in one process never collide in prometheus_client's global registry.
    """

    def __init__(self, rank: int = 0, registry: CollectorRegistry | None = None) -> None:
        if int(rank) < 0:
            raise ValueError(f"rank must be >= 0, got {rank!r}")
        self.rank = int(rank)
        self.registry = registry if registry is not None else CollectorRegistry()
        self._rank_label = str(self.rank)
        self._lock = threading.Lock()
        self._bad_samples_last: dict[str, int] = {}
        self._httpd: Any = None
        self._http_thread: threading.Thread | None = None
        r = self.registry

        self._loss = Gauge(
            "soho_train_loss", "Last training loss per pre-training task.", ["rank", "task"], registry=r
        )
        self._steps = Counter("soho_train_steps_total", "Optimizer steps completed.", ["rank"], registry=r)
        self._samples = Counter(
            "soho_train_samples_total", "Image-text pairs consumed by training.", ["rank"], registry=r
        )
        self._step_duration = Histogram(
            "soho_train_step_duration_seconds",
            "Wall time of one optimizer step, data wait included.",
            ["rank"],
            buckets=STEP_DURATION_BUCKETS,
            registry=r,
        )
        self._data_wait = Counter(
            "soho_data_wait_seconds_total",
            "Seconds the worker waited for the data loader.",
            ["rank"],
            registry=r,
        )
        self._nonfinite = Counter(
            "soho_train_nonfinite_steps_total",
            "Steps whose loss or gradients were NaN/Inf (skipped).",
            ["rank"],
            registry=r,
        )
        self._vd_perplexity = Gauge(
            "soho_vd_perplexity",
            "Perplexity of visual-dictionary code usage (k = uniform use).",
            ["rank"],
            registry=r,
        )
        self._vd_usage = Gauge(
            "soho_vd_usage_ratio", "Fraction of visual-dictionary codes in use.", ["rank"], registry=r
        )
        self._vd_dead = Gauge(
            "soho_vd_dead_codes", "Visual-dictionary codes with no recent assignment.", ["rank"], registry=r
        )
        self._vd_decay = Gauge(
            "soho_vd_ema_decay", "EMA decay of the visual-dictionary update.", ["rank"], registry=r
        )
        self._vd_num_codes = Gauge(
            "soho_vd_num_codes", "Size k of the visual dictionary.", ["rank"], registry=r
        )
        self._ckpt_duration = Histogram(
            "soho_checkpoint_save_duration_seconds",
            "Wall time of one committed checkpoint save.",
            ["rank"],
            buckets=CHECKPOINT_DURATION_BUCKETS,
            registry=r,
        )
        self._ckpt_step = Gauge(
            "soho_checkpoint_last_step", "Step of the last committed checkpoint.", ["rank"], registry=r
        )
        self._ckpt_time = Gauge(
            "soho_checkpoint_last_timestamp_seconds",
            "Unix time of the last committed checkpoint.",
            ["rank"],
            registry=r,
        )
        self._bad_samples = Counter(
            "soho_data_bad_samples_total",
            "Samples the loader rejected, by reason.",
            ["rank", "reason"],
            registry=r,
        )
        self._eval_recall = Gauge(
            "soho_eval_recall",
            "Retrieval recall@k of the last evaluation (0..1).",
            ["rank", "direction", "k"],
            registry=r,
        )
        self._eval_itm = Gauge(
            "soho_eval_itm_accuracy",
            "Held-out ITM accuracy of the last evaluation (0..1, chance 0.5).",
            ["rank"],
            registry=r,
        )
        self._eval_seconds = Gauge(
            "soho_eval_seconds",
            "Wall time of the last evaluation during training (the steps stall for it).",
            ["rank"],
            registry=r,
        )
        self._info = Info("soho_run", "Low-cardinality description of the run.", ["rank"], registry=r)

        # Children that exist from the start, so that rate()/increase() see a 0 before the first
        # event (a counter born at 3 would hide its first 3 increments from increase()).
        # The per-step ones are kept: .labels() validates and locks on every call, once per step is waste.
        rank_label = self._rank_label
        self._step_children = (self._steps.labels(rank=rank_label), self._samples.labels(rank=rank_label),
                               self._step_duration.labels(rank=rank_label),
                               self._data_wait.labels(rank=rank_label))
        self._nonfinite.labels(rank=rank_label)
        self._loss_children: dict[str, Any] = {}
        self._vd_children: tuple[Any, ...] = ()  # made at the first set_vd_health (no 0 before it: alerts)

    # --- HTTP endpoint -------------------------------------------------------------------------
    def start_http_server(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` of this registry in a daemon thread; returns the bound port.

        ``port=0`` lets the OS pick a free port (tests). Raises ``OSError`` naming the address when
        the port is taken, e.g. two workers on one node with the same base port.
        """
        if self._httpd is not None:
            raise RuntimeError(f"metrics server of rank {self.rank} already running on port {self.port}")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {port!r}")
        try:
            httpd, thread = _prom_start_http_server(int(port), addr=addr, registry=self.registry)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot serve metrics of rank {self.rank} on {addr}:{port}: {exc}"
            ) from exc
        self._httpd, self._http_thread = httpd, thread
        logger.info("rank %d serves Prometheus metrics on %s:%d", self.rank, addr, self.port)
        return self.port

    @property
    def port(self) -> int | None:
        """Port the HTTP endpoint is bound to, or None when not serving."""
        return None if self._httpd is None else int(self._httpd.server_address[1])

    def stop_http_server(self) -> None:
        """Stop the endpoint (idempotent); the registry keeps its values."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
        self._httpd, self._http_thread = None, None

    # --- training step -------------------------------------------------------------------------
    def observe_step(
        self,
        losses: Mapping[str, float],
        samples: int,
        step_seconds: float,
        data_wait_seconds: float,
    ) -> None:
        """Record one optimizer step: last losses, +1 step, +samples, step time and data wait.

        Loss values may be NaN/Inf (they are exported as such, which is what the non-finite alert
        and the loss panels should show); counts and durations must be finite and non-negative.
        """
        unknown = sorted(set(losses) - set(LOSS_TASKS))
        if unknown:
            raise ValueError(
                f"observe_step: unknown loss task(s) {unknown}; expected keys among {LOSS_TASKS}"
            )
        samples_f = _check_non_negative("observe_step samples", samples)
        step_s = _check_non_negative("observe_step step_seconds", step_seconds)
        wait_s = _check_non_negative("observe_step data_wait_seconds", data_wait_seconds)
        for task, value in losses.items():
            child = self._loss_children.get(task)
            if child is None:
                child = self._loss_children[task] = self._loss.labels(rank=self._rank_label, task=task)
            child.set(float(value))
        steps, samples_total, step_duration, data_wait = self._step_children
        steps.inc()
        samples_total.inc(samples_f)
        step_duration.observe(step_s)
        data_wait.inc(wait_s)

    def inc_nonfinite(self) -> None:
        """Count one step skipped because its loss or gradients were not finite."""
        self._nonfinite.labels(rank=self._rank_label).inc()

    # --- visual dictionary ---------------------------------------------------------------------
    def set_vd_health(self, health: Mapping[str, float]) -> None:
        """Export ``VisualDictionary.health()``: usage_ratio, perplexity, dead_codes, decay.

        An optional ``num_codes`` key (k) sets ``soho_vd_num_codes`` too, so alerts can compare the
        perplexity with k.
        """
        missing = [key for key in VD_HEALTH_KEYS if key not in health]
        if missing:
            raise ValueError(f"set_vd_health: missing key(s) {missing}; expected {VD_HEALTH_KEYS}")
        if not self._vd_children:
            self._vd_children = tuple(g.labels(rank=self._rank_label) for g in (
                self._vd_usage, self._vd_perplexity, self._vd_dead, self._vd_decay))
        usage, perplexity, dead, decay = self._vd_children
        usage.set(float(health["usage_ratio"]))
        perplexity.set(float(health["perplexity"]))
        dead.set(float(health["dead_codes"]))
        decay.set(float(health["decay"]))
        if "num_codes" in health:
            self.set_vd_num_codes(int(health["num_codes"]))

    def set_vd_num_codes(self, num_codes: int) -> None:
        """Export the dictionary size k (``VDConfig.num_codes``)."""
        if int(num_codes) <= 0:
            raise ValueError(f"set_vd_num_codes: num_codes must be > 0, got {num_codes!r}")
        self._vd_num_codes.labels(rank=self._rank_label).set(int(num_codes))

    # --- checkpoints ---------------------------------------------------------------------------
    def observe_checkpoint(self, step: int, seconds: float, timestamp: float | None = None) -> None:
        """Record a committed checkpoint: save duration, its step and when it was committed."""
        if int(step) < 0:
            raise ValueError(f"observe_checkpoint: step must be >= 0, got {step!r}")
        seconds = _check_non_negative("observe_checkpoint seconds", seconds)
        self._ckpt_duration.labels(rank=self._rank_label).observe(seconds)
        self._ckpt_step.labels(rank=self._rank_label).set(int(step))
        self._ckpt_time.labels(rank=self._rank_label).set(
            time.time() if timestamp is None else float(timestamp)
        )

    # --- data ----------------------------------------------------------------------------------
    def set_bad_samples(self, counts: Mapping[str, int]) -> None:
        """Export the loader's cumulative ``{reason: count}`` as a monotonic counter.

        The loader reports running totals; a counter may only go up, so we add the delta since the
        last call. A total that went down means the loader was rebuilt (new epoch / new process):
        like Prometheus' own reset handling, the new total is counted as fresh increments.
        """
        with self._lock:
            for reason, count in counts.items():
                count = int(count)
                if count < 0:
                    raise ValueError(f"set_bad_samples: count of reason {reason!r} is negative ({count})")
                last = self._bad_samples_last.get(reason, 0)
                delta = count - last if count >= last else count
                if count < last:
                    logger.debug(
                        "bad-sample count for %r went from %d to %d: loader reset", reason, last, count
                    )
                child = self._bad_samples.labels(rank=self._rank_label, reason=str(reason))
                if delta > 0:
                    child.inc(delta)
                self._bad_samples_last[reason] = count

    # --- evaluation ----------------------------------------------------------------------------
    def set_eval(self, recall: Mapping[tuple[str, int], float]) -> None:
        """Export retrieval recall: ``{("t2i", 1): 0.42, ("i2t", 5): 0.8, ...}``."""
        for key, value in recall.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"set_eval: key {key!r} must be a (direction, k) tuple")
            direction, k = key
            if direction not in EVAL_DIRECTIONS:
                raise ValueError(f"set_eval: direction {direction!r} must be one of {EVAL_DIRECTIONS}")
            if int(k) <= 0:
                raise ValueError(f"set_eval: k must be a positive integer, got {k!r}")
            self._eval_recall.labels(rank=self._rank_label, direction=direction, k=str(int(k))).set(
                float(value)
            )

    def set_eval_figures(self, itm_accuracy: float, seconds: float) -> None:
        """Export the last evaluation's ITM accuracy (0..1) and how long it took."""
        value = float(itm_accuracy)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"set_eval_figures: itm_accuracy must be in [0, 1], got {itm_accuracy!r}")
        self._eval_itm.labels(rank=self._rank_label).set(value)
        self._eval_seconds.labels(rank=self._rank_label).set(_check_non_negative("seconds", seconds))

    def set_info(self, config: Mapping[str, Any]) -> None:
        """Describe the run in ``soho_run_info`` using only low-cardinality config keys.

        Nested dicts are searched too (``{"model": {"preset": "tiny"}}`` gives ``preset="tiny"``);
        keys outside ``INFO_KEYS`` are ignored so that paths or URLs never become labels.
        """
        flat = _flatten(config)
        labels: dict[str, str] = {}
        for path, value in flat.items():
            key = path.rsplit(".", 1)[-1]
            if key in INFO_KEYS and key not in labels and value is not None:
                labels[key] = str(value)
        self._info.labels(rank=self._rank_label).info(labels)

    # --- reading back --------------------------------------------------------------------------
    def value(self, name: str, **labels: str) -> float | None:
        """Current value of one sample of this registry (rank label filled in), or None."""
        labels.setdefault("rank", self._rank_label)
        return self.registry.get_sample_value(name, labels)
