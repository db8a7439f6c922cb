"""The token endpoint client against real HTTP servers on loopback (SPEC §4.1).

Well-behaved responses come from an aiohttp app; responses no honest server would send
(lying Content-Length, close-delimited bodies) come from a raw asyncio TCP server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

from tokenferry.dev.certs import ensure_self_signed
from tokenferry.oauth import (
    InvalidTokenResponse,
    OAuthError,
    TokenClientConfig,
    TokenEndpointClient,
    TokenEndpointError,
    TokenEndpointUnavailable,
    TokenResponse,
)

# JWT-shaped secrets: an IdP echoing any of them (or a segment of one) must not leak it.
ASSERTION = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6InN2aWQta2V5In0."
    "eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy9zYW5kYm94L2EiLCJhdWQiOiJpZHAifQ."
    "QVNTRVJUSU9OLVNJR05BVFVSRS1TRUNSRVQtVkFMVUU"
)
SUBJECT_TOKEN = (
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImF1ZCI6InRva2VuZmVycnkifQ."
    "U1VCSkVDVC1UT0tFTi1TSUdOQVRVUkUtU0VDUkVU"
)
ACCESS_TOKEN = "at-0123456789-ACCESS-TOKEN-SECRET_value~+/="
SECRETS = (ASSERTION, SUBJECT_TOKEN, ACCESS_TOKEN, *ASSERTION.split("."), "ACCESS-TOKEN-SECRET")

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"

FAST_RETRY = TokenClientConfig(retry_delay=(0.01, 0.02))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def good_body(**extra: object) -> dict[str, object]:
    return {"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 300, **extra}


def assert_no_secret(exc: BaseException) -> None:
    """Neither the message, the repr nor the whole printed chain contains a secret."""
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# --------------------------------------------------------------------------- servers


@dataclass
class Hit:
    path: str
    form: list[tuple[str, str]]
    headers: dict[str, str]


@dataclass
class FakeIdp:
    """An aiohttp token endpoint; ``routes[path]`` handlers answer in order, one per hit."""

    base: str = ""
    hits: list[Hit] = field(default_factory=list)
    routes: dict[str, list[Handler]] = field(default_factory=dict)

    def url(self, path: str = "/token") -> str:
        return self.base + path

    def count(self, path: str = "/token") -> int:
        return sum(1 for hit in self.hits if hit.path == path)

    def answer(self, path: str, *handlers: Handler) -> None:
        self.routes[path] = list(handlers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.text()
        self.hits.append(
            Hit(
                request.path,
                parse_qsl(body, keep_blank_values=True, strict_parsing=bool(body)),
                dict(request.headers),
            )
        )
        queue = self.routes.get(request.path)
        if queue:
            handler = queue.pop(0) if len(queue) > 1 else queue[0]
            return await handler(request)
        return web.json_response(good_body())


def reply(body: object, status: int = 200, **headers: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=headers)

    return handler


def reply_text(text: str, status: int = 200, content_type: str = "text/plain") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text=text, status=status, content_type=content_type)

    return handler


async def serve(app: web.Application, sock: socket.socket | None = None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site: web.BaseSite = (
        web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, "127.0.0.1", 0)
    )
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    assert isinstance(address, tuple)
    return int(address[1])


@pytest.fixture
async def idp() -> AsyncIterator[FakeIdp]:
    fake = FakeIdp()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = await serve(app)
    fake.base = f"http://127.0.0.1:{bound_port(runner)}"
    yield fake
    await runner.cleanup()


@dataclass
class RawServer:
    """Answers every connection with canned bytes, exactly as given."""

    response: bytes
    connections: int = 0
    port: int = 0

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(self.response)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(response: bytes) -> RawServer:
        raw = RawServer(response)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        raw.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return raw

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[TokenEndpointClient]:
    async with TokenEndpointClient(FAST_RETRY) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- request shapes


async def test_client_credentials_sends_exact_form(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    response = await client.client_credentials(
        idp.url(),
        client_assertion=ASSERTION,
        client_assertion_type=JWT_SPIFFE,
        audience="orders",
        scopes=("orders.read", "orders.write"),
    )
    assert response == TokenResponse(ACCESS_TOKEN, "Bearer", None, 300, None)
    [hit] = idp.hits
    assert hit.form == [
        ("grant_type", "client_credentials"),
        ("client_assertion_type", JWT_SPIFFE),
        ("client_assertion", ASSERTION),
        ("audience", "orders"),
        ("scope", "orders.read orders.write"),
    ]
    assert hit.headers["Accept"] == "application/json"
    assert hit.headers["Content-Type"] == "application/x-www-form-urlencoded"


async def test_client_credentials_defaults_and_omits_unset_fields(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert idp.hits[0].form == [
        ("grant_type", "client_credentials"),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", ASSERTION),
    ]


async def test_token_exchange_sends_exact_form(idp: FakeIdp, client: TokenEndpointClient) -> None:
    idp.answer("/token", reply(good_body(issued_token_type=ACCESS, scope="orders.read")))
    response = await client.token_exchange(
        idp.url(),
        client_assertion=ASSERTION,
        client_assertion_type=JWT_SPIFFE,
        subject_token=SUBJECT_TOKEN,
        subject_token_type="urn:ietf:params:oauth:token-type:jwt",
        requested_token_type="urn:ietf:params:oauth:token-type:jwt",
        audience="spiffe://example.org/sandbox/a",
        scopes=("orders.read",),
    )
    assert response.issued_token_type == ACCESS
    assert response.scope == "orders.read"
    assert idp.hits[0].form == [
        ("grant_type", EXCHANGE),
        ("client_assertion_type", JWT_SPIFFE),
        ("client_assertion", ASSERTION),
        ("subject_token", SUBJECT_TOKEN),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("requested_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("audience", "spiffe://example.org/sandbox/a"),
        ("scope", "orders.read"),
    ]


async def test_token_exchange_defaults_and_omits_unset_fields(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    await client.token_exchange(
        idp.url(),
        client_assertion=ASSERTION,
        client_assertion_type=JWT_BEARER,
        subject_token=SUBJECT_TOKEN,
    )
    assert idp.hits[0].form == [
        ("grant_type", EXCHANGE),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", ASSERTION),
        ("subject_token", SUBJECT_TOKEN),
        ("subject_token_type", ACCESS),
        ("requested_token_type", ACCESS),
    ]


async def test_invalid_arguments_are_refused_before_any_request(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    with pytest.raises(ValueError, match="scope"):
        await client.client_credentials(idp.url(), client_assertion="a", scopes=("a b",))
    with pytest.raises(TypeError):
        await client.client_credentials(idp.url(), client_assertion="a", scopes="orders.read")
    with pytest.raises(ValueError, match="http"):
        await client.client_credentials("ftp://127.0.0.1/token", client_assertion="a")
    assert idp.hits == []


# --------------------------------------------------------------------------- accepted responses


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"access_token": "abc"}, TokenResponse("abc")),
        ({"access_token": "abc", "token_type": "bEaReR"}, TokenResponse("abc", "bEaReR")),
        (
            {"access_token": "a.b-c_d~e+f/g==", "token_type": "N_A", "issued_token_type": "x"},
            TokenResponse("a.b-c_d~e+f/g==", "N_A", "x"),
        ),
        ({"access_token": "abc", "expires_in": 60}, TokenResponse("abc", expires_in=60)),
        ({"access_token": "abc", "expires_in": "60"}, TokenResponse("abc")),
        ({"access_token": "abc", "expires_in": True}, TokenResponse("abc")),
        ({"access_token": "abc", "expires_in": 0}, TokenResponse("abc")),
        ({"access_token": "abc", "expires_in": -5}, TokenResponse("abc")),
        ({"access_token": "abc", "expires_in": 60.5}, TokenResponse("abc")),
        ({"access_token": "abc", "scope": ["x"]}, TokenResponse("abc")),
        ({"access_token": "x" * 16 * 1024}, TokenResponse("x" * 16 * 1024)),
    ],
)
async def test_acceptable_responses(
    idp: FakeIdp, client: TokenEndpointClient, body: object, expected: TokenResponse
) -> None:
    idp.answer("/token", reply(body))
    assert await client.client_credentials(idp.url(), client_assertion=ASSERTION) == expected


async def test_token_response_repr_hides_the_token() -> None:
    assert ACCESS_TOKEN not in repr(TokenResponse(ACCESS_TOKEN, "Bearer"))


# --------------------------------------------------------------------------- rejected responses


@pytest.mark.parametrize(
    "handler",
    [
        reply_text("<html>login</html>", content_type="text/html"),
        reply_text(""),
        reply_text('{"access_token": "abc"'),
        reply_text('{"access_token": "abc", "n": ' + "9" * 5000 + "}"),  # int over 4300 digits
        reply_text("[" * 30_000 + "]" * 30_000),  # deep nesting, under the size cap
        reply(["access_token", ACCESS_TOKEN]),
        reply("abc"),
        reply({}),
        reply({"token_type": "Bearer"}),
        reply({"access_token": None}),
        reply({"access_token": 12345}),
        reply({"access_token": ""}),
        reply({"access_token": ACCESS_TOKEN + " x"}),
        reply({"access_token": ACCESS_TOKEN + "\r\nX-Injected: 1"}),
        reply({"access_token": "abc==def"}),
        reply({"access_token": "abcé"}),
        reply({"access_token": "x" * (16 * 1024 + 1)}),
        reply({"access_token": ACCESS_TOKEN, "token_type": "mac"}),
        reply({"access_token": ACCESS_TOKEN, "token_type": "n_a"}),
        reply({"access_token": ACCESS_TOKEN, "token_type": "DPoP"}),
        reply({"access_token": ACCESS_TOKEN, "token_type": 1}),
    ],
)
async def test_unacceptable_responses_are_invalid(
    idp: FakeIdp, client: TokenEndpointClient, handler: Handler
) -> None:
    idp.answer("/token", handler)
    with pytest.raises(InvalidTokenResponse) as caught:
        await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert idp.count() == 1  # an answer, not an outage: no retry
    assert_no_secret(caught.value)


# --------------------------------------------------------------------------- size cap


async def test_body_of_exactly_the_cap_is_accepted(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    text = json.dumps({"access_token": "abc"})
    text += " " * (64 * 1024 - len(text))
    idp.answer("/token", reply_text(text, content_type="application/json"))
    assert (await client.client_credentials(idp.url(), client_assertion="a")).access_token == "abc"


async def test_body_over_the_cap_with_content_length_is_refused(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    text = json.dumps({"access_token": "abc"})
    text += " " * (64 * 1024 + 1 - len(text))
    idp.answer("/token", reply_text(text, content_type="application/json"))
    with pytest.raises(InvalidTokenResponse, match="larger than 65536 bytes"):
        await client.client_credentials(idp.url(), client_assertion="a")


async def test_endless_chunked_body_is_abandoned_at_the_cap(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    written: list[int] = []
    finished = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            await response.write(b'{"access_token": "abc", "pad": "')
            for _ in range(2000):  # up to 125 MiB: far more than any buffer in between
                await response.write(b"x" * 65536)
                written.append(1)
        except (ConnectionError, RuntimeError):
            pass
        finished.set()
        return response

    idp.answer("/token", endless)
    with pytest.raises(InvalidTokenResponse, match="larger than"):
        await client.client_credentials(idp.url(), client_assertion="a")
    await finished.wait()
    assert len(written) < 2000  # the client hung up instead of reading it all
    assert "Transfer-Encoding" not in idp.hits[0].headers  # our request was a plain POST


async def test_close_delimited_body_over_the_cap_is_refused(
    raw_server: Callable[[bytes], Awaitable[RawServer]], client: TokenEndpointClient
) -> None:
    body = b'{"access_token": "abc", "pad": "' + b"x" * 70_000 + b'"}'
    raw = await raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + body
    )
    with pytest.raises(InvalidTokenResponse, match="larger than"):
        await client.client_credentials(raw.url(), client_assertion="a")
    assert raw.connections == 1


async def test_content_length_claiming_less_than_sent_is_not_trusted(
    raw_server: Callable[[bytes], Awaitable[RawServer]], client: TokenEndpointClient
) -> None:
    body = b'{"access_token": "abc", "pad": "' + b"x" * 100_000 + b'"}'
    raw = await raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n" + body
    )
    # aiohttp stops at the declared length and then finds garbage where the next response
    # should start; either way the answer is refused, and its bytes are not repeated.
    with pytest.raises((InvalidTokenResponse, TokenEndpointUnavailable)) as caught:
        await client.client_credentials(raw.url(), client_assertion="a")
    assert raw.connections == 1
    assert "xxxxxxxx" not in "".join(traceback.format_exception(caught.value))


async def test_content_length_over_the_cap_is_refused_without_reading(
    raw_server: Callable[[bytes], Awaitable[RawServer]], client: TokenEndpointClient
) -> None:
    # Claims 10 MB, sends a small valid-looking start and then nothing.
    raw = await raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        b'{"access_token": "abc"}'
    )
    with pytest.raises(InvalidTokenResponse, match="larger than"):
        await client.client_credentials(raw.url(), client_assertion="a")


async def test_truncated_body_is_unavailable_not_accepted(
    raw_server: Callable[[bytes], Awaitable[RawServer]], client: TokenEndpointClient
) -> None:
    raw = await raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
        b'{"access_token": "abc"}'
    )
    with pytest.raises(TokenEndpointUnavailable, match="broken HTTP response"):
        await client.client_credentials(raw.url(), client_assertion="a")
    assert raw.connections == 1  # an answer arrived, broken: not retried


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_is_not_followed(
    idp: FakeIdp, client: TokenEndpointClient, status: int
) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": idp.url("/elsewhere")})

    idp.answer("/token", redirect)
    with pytest.raises(InvalidTokenResponse, match=f"redirect \\(HTTP {status}\\)"):
        await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert idp.count("/token") == 1
    assert idp.count("/elsewhere") == 0


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_one_retry_on_gateway_statuses_then_success(
    idp: FakeIdp, client: TokenEndpointClient, status: int
) -> None:
    idp.answer("/token", reply_text("busy", status=status), reply(good_body()))
    response = await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert response.access_token == ACCESS_TOKEN
    assert idp.count() == 2
    assert idp.hits[0].form == idp.hits[1].form


async def test_one_retry_on_503_then_failure(idp: FakeIdp, client: TokenEndpointClient) -> None:
    idp.answer("/token", reply_text("<h1>Service Unavailable</h1>", status=503))
    with pytest.raises(TokenEndpointUnavailable) as caught:
        await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert idp.count() == 2
    assert caught.value.status == 503
    assert "HTTP 503" in str(caught.value)
    assert "Service Unavailable" not in str(caught.value)


async def test_rfc_error_on_503_after_retry_is_reported(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    idp.answer("/token", reply({"error": "temporarily_unavailable"}, status=503))
    with pytest.raises(TokenEndpointError) as caught:
        await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert (caught.value.status, caught.value.error) == (503, "temporarily_unavailable")
    assert idp.count() == 2


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, {"error": "invalid_grant"}, TokenEndpointError),
        (401, {"error": "invalid_client"}, TokenEndpointError),
        (400, "<html>bad</html>", TokenEndpointUnavailable),
        (500, {"error": "server_error"}, TokenEndpointError),
        (500, "<html>oops</html>", TokenEndpointUnavailable),
        (404, "not found", TokenEndpointUnavailable),
    ],
)
async def test_no_retry_on_other_statuses(
    idp: FakeIdp,
    client: TokenEndpointClient,
    status: int,
    body: object,
    expected: type[OAuthError],
) -> None:
    handler = reply(body, status) if isinstance(body, dict) else reply_text(str(body), status)
    idp.answer("/token", handler)
    with pytest.raises(expected) as caught:
        await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert idp.count() == 1
    assert getattr(caught.value, "status", None) == status


class RetryLog(logging.Handler):
    """Calls ``on_retry`` synchronously when the client announces its retry."""

    def __init__(self, on_retry: Callable[[logging.LogRecord], None]) -> None:
        super().__init__()
        self.on_retry = on_retry
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.records.append(record)
            self.on_retry(record)


@pytest.fixture
def retry_log() -> Iterator[Callable[[Callable[[logging.LogRecord], None]], RetryLog]]:
    logger = logging.getLogger("tokenferry.oauth")
    handlers: list[RetryLog] = []
    old_level = logger.level

    def install(on_retry: Callable[[logging.LogRecord], None]) -> RetryLog:
        handler = RetryLog(on_retry)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        handlers.append(handler)
        return handler

    yield install
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(old_level)


async def test_connection_refused_is_retried_once_after_jitter(
    retry_log: Callable[[Callable[[logging.LogRecord], None]], RetryLog],
) -> None:
    port = free_port()
    listener: list[socket.socket] = []
    listening = asyncio.Event()

    def open_port(record: logging.LogRecord) -> None:
        # The first attempt was refused; start listening on that very port before the
        # retry, so the retry (and only it) reaches a server. Connections queue in the
        # backlog until the app below serves the socket.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        listener.append(sock)
        listening.set()

    log = retry_log(open_port)
    fake = FakeIdp(base=f"http://127.0.0.1:{port}")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner: web.AppRunner | None = None

    async with TokenEndpointClient() as client:  # default jitter: 200-500 ms
        attempt = asyncio.create_task(
            client.client_credentials(fake.url(), client_assertion=ASSERTION)
        )
        opened = asyncio.create_task(listening.wait())
        await asyncio.wait([attempt, opened], return_when=asyncio.FIRST_COMPLETED)
        opened.cancel()
        if listener:
            runner = await serve(app, listener[0])
        try:
            response = await attempt
        finally:
            if runner is not None:
                await runner.cleanup()
    assert response.access_token == ACCESS_TOKEN
    assert fake.count() == 1
    assert len(log.records) == 1
    delay = log.records[0].__dict__["delay_s"]
    assert 0.2 <= delay <= 0.5


async def test_connection_refused_twice_gives_unavailable(
    retry_log: Callable[[Callable[[logging.LogRecord], None]], RetryLog],
    client: TokenEndpointClient,
) -> None:
    log = retry_log(lambda record: None)
    with pytest.raises(TokenEndpointUnavailable, match="unreachable") as caught:
        await client.client_credentials(
            f"http://127.0.0.1:{free_port()}/token", client_assertion=ASSERTION
        )
    assert len(log.records) == 1
    assert caught.value.status is None
    assert_no_secret(caught.value)


async def test_server_closing_without_answer_is_retried_once(
    raw_server: Callable[[bytes], Awaitable[RawServer]], client: TokenEndpointClient
) -> None:
    raw = await raw_server(b"")  # reads the request, then closes without a byte
    with pytest.raises(TokenEndpointUnavailable, match="unreachable"):
        await client.client_credentials(raw.url(), client_assertion=ASSERTION)
    assert raw.connections == 2


async def test_total_timeout_is_not_retried(idp: FakeIdp) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await never.wait()
        return web.Response()

    idp.answer("/token", hang)
    config = TokenClientConfig(total_timeout=0.3, retry_delay=(0.01, 0.02))
    try:
        async with TokenEndpointClient(config) as client:
            with pytest.raises(TokenEndpointUnavailable, match=r"did not answer within 0\.3 s"):
                await client.client_credentials(idp.url(), client_assertion=ASSERTION)
        assert idp.count() == 1
    finally:
        never.set()  # let the server shut down without waiting for the handler


# --------------------------------------------------------------------------- error sanitising


async def test_rfc_error_fields_are_reported(idp: FakeIdp, client: TokenEndpointClient) -> None:
    idp.answer(
        "/token",
        reply({"error": "invalid_grant", "error_description": "subject token expired"}, 400),
    )
    with pytest.raises(TokenEndpointError) as caught:
        await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    error = caught.value
    assert (error.status, error.error, error.description) == (
        400,
        "invalid_grant",
        "subject token expired",
    )
    assert "invalid_grant" in str(error) and "subject token expired" in str(error)
    assert idp.url() in str(error)


async def test_rfc_error_control_characters_removed(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    idp.answer(
        "/token",
        reply(
            {
                "error": "invalid_\x1b[31mgrant\x00",
                "error_description": "line1\r\nFAKE LOG LINE\x7f\x85\u202eevil\u2028end\tx",
            },
            400,
        ),
    )
    with pytest.raises(TokenEndpointError) as caught:
        await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert caught.value.error == "invalid_[31mgrant"
    assert caught.value.description == "line1FAKE LOG LINEevilendx"
    assert not any(ch in str(caught.value) for ch in "\x1b\x00\r\n\x7f\x85\u202e\u2028\t")


async def test_rfc_error_fields_cut_to_256_characters(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    idp.answer("/token", reply({"error": "e" * 1000, "error_description": "d" * 1000}, 400))
    with pytest.raises(TokenEndpointError) as caught:
        await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert caught.value.error == "e" * 256
    assert caught.value.description == "d" * 256


@pytest.mark.parametrize(
    "handler",
    [
        reply_text("<html>upstream said ECHOED-BODY-MARKER</html>", 400, "text/html"),
        reply({"message": "ECHOED-BODY-MARKER"}, 400),
        reply({"error": 42, "error_description": "ECHOED-BODY-MARKER"}, 400),
        reply({"error": "\x00\x01", "error_description": "ECHOED-BODY-MARKER"}, 400),
    ],
)
async def test_non_rfc_error_bodies_are_never_echoed(
    idp: FakeIdp, client: TokenEndpointClient, handler: Handler
) -> None:
    idp.answer("/token", handler)
    with pytest.raises(TokenEndpointUnavailable) as caught:
        await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert "ECHOED-BODY-MARKER" not in "".join(traceback.format_exception(caught.value))
    assert "HTTP 400" in str(caught.value)


async def test_rfc_error_description_echoing_secrets_is_redacted(
    idp: FakeIdp, client: TokenEndpointClient
) -> None:
    header, payload, _ = ASSERTION.split(".")
    idp.answer(
        "/token",
        reply(
            {
                "error": "invalid_client",
                "error_description": f"bad assertion {ASSERTION}; subject {SUBJECT_TOKEN}",
            },
            400,
        ),
        reply(
            {"error": "invalid_client", "error_description": f"bad claims {payload} / {header}"},
            400,
        ),
    )
    for _ in range(2):
        with pytest.raises(TokenEndpointError) as caught:
            await client.token_exchange(
                idp.url(),
                client_assertion=ASSERTION,
                client_assertion_type=JWT_SPIFFE,
                subject_token=SUBJECT_TOKEN,
            )
        assert caught.value.description is not None
        assert "[redacted]" in caught.value.description
        assert_no_secret(caught.value)


# --------------------------------------------------------------------------- environment, TLS


async def test_proxy_environment_is_ignored(
    idp: FakeIdp,
    raw_server: Callable[[bytes], Awaitable[RawServer]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = await raw_server(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.port}")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    async with TokenEndpointClient(FAST_RETRY) as client:
        response = await client.client_credentials(idp.url(), client_assertion=ASSERTION)
    assert response.access_token == ACCESS_TOKEN
    assert proxy.connections == 0
    assert idp.count() == 1


async def test_https_endpoint_with_private_ca(tmp_path: Path) -> None:
    tls = ensure_self_signed(tmp_path, hosts=("127.0.0.1",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls.cert_file, tls.key_file)
    fake = FakeIdp()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    try:
        url = f"https://127.0.0.1:{bound_port(runner)}/token"
        trusted = ssl.create_default_context(cafile=str(tls.ca_file))
        config = TokenClientConfig(ssl_context=trusted, retry_delay=(0.01, 0.02))
        async with TokenEndpointClient(config) as client:
            response = await client.client_credentials(url, client_assertion=ASSERTION)
        assert response.access_token == ACCESS_TOKEN
        # Without the private CA the certificate is refused, and not retried.
        async with TokenEndpointClient(FAST_RETRY) as client:
            with pytest.raises(TokenEndpointUnavailable, match="TLS verification") as caught:
                await client.client_credentials(url, client_assertion=ASSERTION)
        assert_no_secret(caught.value)
        assert fake.count() == 1
    finally:
        await runner.cleanup()


async def test_closed_client_refuses_requests(idp: FakeIdp) -> None:
    client = TokenEndpointClient()
    await client.client_credentials(idp.url(), client_assertion="a")
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await client.client_credentials(idp.url(), client_assertion="a")
