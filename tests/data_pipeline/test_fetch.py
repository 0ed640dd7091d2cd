"""``data_pipeline.fetch.Fetcher`` against a misbehaving server on 127.0.0.1: every failure has its reason."""

from __future__ import annotations

import time

import pytest
from helpers import jpeg_bytes
from web_server import closed_port_url, web_server

from data_pipeline.fetch import Fetcher, robots_noai
from data_pipeline.images import BadSample

IMG = {f"g{i}.jpg": jpeg_bytes(i, (40, 30)) for i in range(6)}


def _reason(f: Fetcher, url: str) -> str:
    with pytest.raises(BadSample) as e:
        f.fetch(url)
    return e.value.reason


def test_fetcher_reasons_deadline_reuse_and_retry() -> None:
    with web_server(IMG, drip_interval=0.2, huge_bytes=64 << 20) as srv:
        f = Fetcher(timeout=1.0, retries=1, max_bytes=1 << 20, pool_size=4, backoff=0.05)
        # Good images, one after the other: one kept-alive connection serves them all.
        for name, data in IMG.items():
            assert f.fetch(f"{srv.url}/img/{name}") == data
        assert len({r["port"] for r in srv.requests("img")}) == 1
        # A 503 is retried (urllib3 Retry policy) and the second answer is used.
        assert f.fetch(f"{srv.url}/flaky/g0.jpg") == IMG["g0.jpg"]
        assert [r["status"] for r in srv.requests("flaky")] == [503, 200]
        assert _reason(f, f"{srv.url}/early-close/a.jpg") == "url_incomplete_read"
        assert len(srv.requests("early-close")) == 2  # a read error is retried once, then reported
        assert _reason(f, f"{srv.url}/banner/a.jpg") == "url_bad_response"
        assert _reason(f, f"{srv.url}/nope.jpg") == "url_http_404"
        assert len(srv.requests("404")) == 1  # a 404 is not retried
        assert _reason(f, closed_port_url()) == "url_connection_refused"
        assert _reason(f, f"{srv.url}/huge-declared/a.jpg") == "url_too_large"
        assert _reason(f, f"{srv.url}/huge/a.jpg") == "url_too_large"
        assert _reason(f, f"{srv.url}/noai/g1.jpg") == "url_robots_noai"
        assert Fetcher(timeout=1.0, respect_noai=False).fetch(f"{srv.url}/noai/g1.jpg") == IMG["g1.jpg"]
        # The drip sends a byte every 0.2 s, so no single read ever times out: only a total deadline cuts it.
        t = time.monotonic()
        assert _reason(f, f"{srv.url}/drip/a.jpg") == "url_timeout"
        # 1 s deadline + slack for a loaded machine (without the deadline: 5.5 h)
        assert 0.9 <= time.monotonic() - t < 3.0
        deadline = time.monotonic() + 10
        while not srv.requests("huge") and time.monotonic() < deadline:  # logged once its writes fail
            time.sleep(0.02)
    # The server stopped sending the oversized body soon after the cap (it was not read to the end).
    assert srv.requests("huge")[0]["sent"] < 32 << 20


def test_robots_noai_header_forms() -> None:
    assert robots_noai(["noai"]) and robots_noai(["noindex, NoImageAI"]) and robots_noai(["*: noai"])
    assert robots_noai(["soho-data-pipeline: noimageai"])
    assert not robots_noai(["otherbot: noai"]) and not robots_noai(["noindex, nofollow"])
    assert not robots_noai([])
