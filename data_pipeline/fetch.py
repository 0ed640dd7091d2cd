"""HTTP(S) image fetching for the shard job: a polite crawler client, not a script's ``urlopen``.

* urllib3's ``PoolManager`` (one per worker process, shared by its fetch threads): connections to a host
  are kept alive and reused, up to ``pool_size`` per host.
* urllib3's ``Retry`` decides which failures are retried (connect errors, read errors, 429/5xx) and the
  backoff between attempts; the loop here runs it so that ``timeout`` is a **total** deadline for the
  URL (every attempt, redirect, backoff and body byte together): a server that drips one byte at a time
  is cut at the deadline, because the socket's timeout is re-armed to the time left before every read.
* The body is streamed: a ``Content-Length`` over ``max_bytes`` is refused before any byte is read, and a
  body without one is refused as soon as it passes the cap; at most ``max_bytes`` are ever held.
* An identifying ``User-Agent``; ``X-Robots-Tag: noai`` / ``noimageai`` (img2dataset's convention, for
  every agent or for ours) makes the image skipped and reported, unless ``respect_noai=False``.

Every failure raises ``images.BadSample`` with a stable reason (see ``REASONS``); nothing else escapes
``Fetcher.fetch`` except programming errors, which the caller reports as ``unexpected_error``.
"""

from __future__ import annotations

import http.client
import socket
import time

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationValueError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
    SSLError,
)
from urllib3.util.retry import Retry

from data_pipeline.images import BadSample

USER_AGENT = "soho-data-pipeline/1.0 (image-text dataset builder; honours X-Robots-Tag noai/noimageai)"
DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # a 50-megapixel camera JPEG is ~25 MB; real web photos far less
CHUNK = 64 * 1024

URL_HTTP_ERROR = "url_http_{code}"
URL_TIMEOUT = "url_timeout"
URL_CONNECTION_REFUSED = "url_connection_refused"
URL_DNS_ERROR = "url_dns_error"
URL_INCOMPLETE_READ = "url_incomplete_read"  # the server closed before sending Content-Length bytes
URL_BAD_RESPONSE = "url_bad_response"  # not HTTP (BadStatusLine), or closed without a response
URL_TOO_LARGE = "url_too_large"  # over --max-image-bytes
URL_ROBOTS_NOAI = "url_robots_noai"  # X-Robots-Tag: noai / noimageai
URL_SSL_ERROR = "url_ssl_error"
URL_TOO_MANY_REDIRECTS = "url_too_many_redirects"
URL_ERROR = "url_error"  # anything else the network layer raised (reported with its type and message)
REASONS = (URL_TIMEOUT, URL_CONNECTION_REFUSED, URL_DNS_ERROR, URL_INCOMPLETE_READ, URL_BAD_RESPONSE,
           URL_TOO_LARGE, URL_ROBOTS_NOAI, URL_SSL_ERROR, URL_TOO_MANY_REDIRECTS, URL_ERROR)
NOAI_DIRECTIVES = frozenset(("noai", "noimageai"))
RETRY_STATUSES = frozenset((429, 500, 502, 503, 504))


class _Deadline(Exception):
    pass


def robots_noai(values: list[str], agent: str = "soho-data-pipeline") -> bool:
    """True if any ``X-Robots-Tag`` value forbids AI use for every agent or for ``agent``.

    Values are ``directive, directive`` or ``agent: directive, directive`` (Google's syntax).
    """
    for value in values:
        head, sep, rest = value.partition(":")
        if sep and "," not in head and head.strip().lower() not in NOAI_DIRECTIVES:
            if head.strip().lower() not in ("*", agent.lower()):
                continue  # addressed to another crawler
            value = rest
        if NOAI_DIRECTIVES & {d.strip().lower() for d in value.split(",")}:
            return True
    return False


def classify(e: BaseException, url: str) -> BadSample:
    """urllib3 / socket exception → BadSample with a stable reason and the cause in the detail."""
    if isinstance(e, MaxRetryError):
        if e.reason is None or isinstance(e.reason, ResponseError):
            return BadSample(URL_TOO_MANY_REDIRECTS, f"{url}: {e}")
        e = e.reason
    cause = e.args[1] if isinstance(e, ProtocolError) and len(e.args) > 1 else None
    detail = f"{url}: {type(e).__name__}: {e}"
    if isinstance(e, NameResolutionError):
        return BadSample(URL_DNS_ERROR, detail)
    if isinstance(e, NewConnectionError):  # before ConnectTimeoutError: it is a subclass
        if isinstance(e.__cause__ or e.__context__, ConnectionRefusedError) or "refused" in str(e).lower():
            return BadSample(URL_CONNECTION_REFUSED, url)
        return BadSample(URL_ERROR, detail)
    if isinstance(e, (ConnectTimeoutError, ReadTimeoutError, TimeoutError, socket.timeout, _Deadline)):
        return BadSample(URL_TIMEOUT, url)
    if isinstance(cause, http.client.IncompleteRead) or isinstance(e, http.client.IncompleteRead):
        return BadSample(URL_INCOMPLETE_READ, detail)
    if isinstance(cause, (http.client.BadStatusLine, http.client.RemoteDisconnected)):
        return BadSample(URL_BAD_RESPONSE, detail)
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return BadSample(URL_TIMEOUT, url)
    if isinstance(e, SSLError):
        return BadSample(URL_SSL_ERROR, detail)
    if isinstance(e, ProtocolError) and isinstance(cause, http.client.HTTPException):
        return BadSample(URL_BAD_RESPONSE, detail)
    return BadSample(URL_ERROR, detail)


class Fetcher:
    """Thread-safe fetcher; create one per process (connection pools do not survive a fork)."""

    def __init__(
        self,
        timeout: float = 10.0,
        retries: int = 2,
        max_bytes: int = DEFAULT_MAX_BYTES,
        pool_size: int = 16,
        user_agent: str = USER_AGENT,
        respect_noai: bool = True,
        max_redirects: int = 5,
        backoff: float = 0.2,
    ) -> None:
        self.timeout, self.max_bytes, self.respect_noai = timeout, max_bytes, respect_noai
        self.pool = urllib3.PoolManager(num_pools=256, maxsize=max(1, pool_size), block=False,
                                        headers={"User-Agent": user_agent, "Accept": "image/*,*/*;q=0.8"})
        self.agent = user_agent.split("/", 1)[0]
        # The retry policy: which errors and statuses are retried, how often, and the backoff between tries.
        self.policy = Retry(total=retries, connect=retries, read=retries, status=retries, other=0, redirect=0,
                            status_forcelist=RETRY_STATUSES, backoff_factor=backoff, backoff_max=2.0,
                            raise_on_status=False, respect_retry_after_header=False)
        # One attempt: urllib3 follows redirects itself, retries nothing (the loop below does).
        self.attempt = Retry(total=None, connect=0, read=0, status=0, other=0, redirect=max_redirects,
                             raise_on_redirect=True, raise_on_status=False)

    def fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        policy = self.policy
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BadSample(URL_TIMEOUT, f"{url}: no answer within the {self.timeout:g}s deadline")
            try:
                resp = self.pool.urlopen("GET", url, retries=self.attempt, preload_content=False,
                                         timeout=urllib3.Timeout(connect=left, read=left))
            except LocationValueError as e:
                raise BadSample(URL_ERROR, f"{url}: {e}") from None
            except HTTPError as e:
                if isinstance(e, MaxRetryError):  # one attempt's own limits: redirects, or the error it hit
                    if e.reason is None or isinstance(e.reason, ResponseError):
                        raise classify(e, url) from None
                    e = e.reason
                try:
                    policy = policy.increment("GET", url, error=e)
                except Exception:  # exhausted (MaxRetryError) or not retryable: report the original error
                    raise classify(e, url) from None
                self._backoff(policy, deadline)
                continue
            try:
                if resp.status >= 400:
                    if resp.status in RETRY_STATUSES and policy.is_retry("GET", resp.status):
                        try:
                            policy = policy.increment("GET", url, response=resp)
                        except MaxRetryError:
                            raise BadSample(URL_HTTP_ERROR.format(code=resp.status), url) from None
                        self._discard(resp)
                        self._backoff(policy, deadline)
                        continue
                    raise BadSample(URL_HTTP_ERROR.format(code=resp.status), url)
                if self.respect_noai and robots_noai(resp.headers.getlist("X-Robots-Tag"), self.agent):
                    raise BadSample(URL_ROBOTS_NOAI, f"{url}: X-Robots-Tag "
                                    f"{', '.join(resp.headers.getlist('X-Robots-Tag'))}")
                return self._body(resp, url, deadline)
            except BadSample:
                self._discard(resp)
                raise
            except (HTTPError, OSError, http.client.HTTPException, _Deadline) as e:
                self._discard(resp)
                bad = classify(e, url)
                if bad.reason in (URL_TIMEOUT, URL_TOO_LARGE):
                    raise bad from None
                try:
                    policy = policy.increment("GET", url, error=e if isinstance(e, HTTPError) else
                                              ProtocolError(str(e), e))
                except Exception:
                    raise bad from None
                self._backoff(policy, deadline)

    def _body(self, resp: urllib3.BaseHTTPResponse, url: str, deadline: float) -> bytes:
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise BadSample(URL_TOO_LARGE,
                            f"{url}: Content-Length {length} > --max-image-bytes {self.max_bytes}")
        parts: list[bytes] = []
        got = 0
        sock = getattr(resp.connection, "sock", None)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Deadline()
            if sock is not None:
                sock.settimeout(left)  # the total deadline, not a per-read one
            chunk = resp.read1(CHUNK)
            if not chunk:
                break
            got += len(chunk)
            if got > self.max_bytes:
                raise BadSample(URL_TOO_LARGE, f"{url}: body over --max-image-bytes {self.max_bytes}")
            parts.append(chunk)
        resp.release_conn()  # fully read: the connection goes back to the pool for the next URL
        return b"".join(parts)

    @staticmethod
    def _discard(resp: urllib3.BaseHTTPResponse) -> None:
        """Drop a response we will not read to the end: close its connection instead of draining it."""
        try:
            resp.close()
            resp.release_conn()
        except Exception:  # best effort: the connection is unusable anyway
            pass

    @staticmethod
    def _backoff(policy: Retry, deadline: float) -> None:
        time.sleep(max(0.0, min(policy.get_backoff_time(), deadline - time.monotonic())))

    def close(self) -> None:
        self.pool.clear()
