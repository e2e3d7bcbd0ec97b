"""A thin HTTP front for `serve`: refuses bad inference requests with 400 before Triton sees them.

Measured on Triton 2.51 (PyTriton 0.7.0): malformed JSON and a non-string element of a BYTES
input are answered 500 by Triton's HTTP frontend, and an error raised by a PyTriton infer
function (an empty text) is a 500 for every request of the merged batch. The front checks what
only the client can get wrong (JSON, tensor name, datatype, shape, batch size, element types,
empty texts) and answers 400 with one clear message; a good request is forwarded unchanged
(the body as received) to Triton on an internal loopback port, and so is every other path
(health, metadata, statistics). An overloaded queue is Triton's answer (503-class) passed on.
gRPC clients talk to Triton directly.

Requests that made Triton 2.51 itself exit (measured; `serve` then ends, see Server.wait) are
refused here: `classification` on a requested output (Triton's classification extension on the
BYTES `label`; over gRPC `class_count` does the same, and there is no front there), and a body
over MAX_BODY_BYTES (413). Triton's own 500s for a malformed `outputs`, `parameters` or `id`
and for a lone surrogate in a text are 400s here. With Triton gone the answer is a JSON 502.
"""
from __future__ import annotations

import asyncio
import json
import posixpath
import re
import threading

# An infer path as Triton routes it, any version: Triton resolves dot segments and reads a version
# as a number (measured: /v2/models/M/./infer and /v2/models/M/versions/01/infer reached its infer
# unchecked), so the gateway checks and forwards the path canonical_path makes.
INFER_PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/[^/]*)?/infer")
# Content-Encoding is not forwarded: the body forwarded is the decompressed one. The binary-data
# header (Inference-Header-Content-Length) goes both ways, so do Accept-Encoding / Content-Encoding.
FORWARDED_REQUEST_HEADERS = ("content-type", "inference-header-content-length", "accept", "accept-encoding",
                             "triton-access-token")
FORWARDED_RESPONSE_HEADERS = ("content-type", "inference-header-content-length", "content-encoding")


HEADER_LENGTH = "Inference-Header-Content-Length"
# Measured on Triton 2.51's HTTP frontend: a 4,194,204-byte JSON body (and 6 MB ones) made tritonserver
# crash (SIGSEGV; triton-inference-server/server#5840), 4,150,000 bytes were served. Bodies above this
# (after any Content-Encoding is undone) are refused with 413, whatever the path.
MAX_BODY_BYTES = 4_000_000


def split_bytes_tensor(raw: bytes) -> list[bytes] | None:
    """The elements of a BYTES tensor in the binary tensor data extension: each a 4-byte
    little-endian unsigned length followed by that many bytes. None if `raw` is not exactly that."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            return None
        n = int.from_bytes(raw[pos:pos + 4], "little")
        pos += 4
        if pos + n > len(raw):
            return None
        out.append(raw[pos:pos + n])
        pos += n
    return out


def check_infer_body(body: bytes, input_name: str, max_batch_size: int, header_length: str | None = None) -> str | None:
    """None if the request is well formed, else the message of a 400.

    Two encodings of KServe v2 (triton-inference-server/server docs/protocol/extension_binary_data.md):
    a JSON body, or, with the `Inference-Header-Content-Length` header (what tritonclient.http sends
    by default), a JSON header of that many bytes followed by the raw tensor data of every input
    that has a `binary_data_size` parameter, in input order (BYTES: length-prefixed elements)."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            return f"{HEADER_LENGTH} must be a number of bytes, got {header_length!r}"
        if not 0 < n <= len(body):
            return f"{HEADER_LENGTH} {n} does not fit the body ({len(body)} bytes)"
        body, binary = body[:n], body[n:]
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        hint = (f" (binary tensor data needs the {HEADER_LENGTH} header)"
                if header_length is None and str(e).startswith("Extra data") else "")
        return f"malformed JSON: {e}{hint}"
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        return "the body must be a JSON object with a non-empty 'inputs' list (KServe v2)"
    msg = check_request_fields(req)
    if msg is not None:
        return msg
    names = [i.get("name") if isinstance(i, dict) else None for i in req["inputs"]]
    if names != [input_name]:
        return f"expected exactly one input named '{input_name}', got {names}"
    inp = req["inputs"][0]
    if inp.get("datatype") != "BYTES":
        return f"input '{input_name}' must have datatype BYTES, got {inp.get('datatype')!r}"
    shape = inp.get("shape")
    if not (isinstance(shape, list) and len(shape) in (1, 2)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
            and (len(shape) == 1 or shape[1] == 1)):
        return f"input '{input_name}' shape must be [n, 1] (n texts), got {shape!r}"
    if shape[0] > max_batch_size:
        return f"{shape[0]} texts in one request, at most {max_batch_size} (--max-batch-size)"
    params = inp.get("parameters", {})
    if not isinstance(params, dict):
        return f"input '{input_name}' parameters must be a JSON object, got {type(params).__name__}"
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            return (f"input '{input_name}': binary_data_size {size!r}, but {len(binary)} bytes follow the JSON header"
                    + ("" if header_length is not None else f" (no {HEADER_LENGTH} header)"))
        if "data" in inp:
            return f"input '{input_name}' has both 'data' and binary_data_size"
        flat = split_bytes_tensor(binary)
        if flat is None or len(flat) != shape[0]:
            return f"input '{input_name}' binary data must hold {shape[0]} length-prefixed strings (BYTES)"
    else:
        if binary:
            return f"{len(binary)} bytes follow the JSON header, but input '{input_name}' has no binary_data_size"
        flat = inp.get("data")
        while isinstance(flat, list) and flat and isinstance(flat[0], list):
            flat = [x for row in flat for x in row]
        if not isinstance(flat, list) or len(flat) != shape[0]:
            return f"input '{input_name}' data must hold {shape[0]} strings"
    for i, t in enumerate(flat):
        if isinstance(t, bytes):
            try:
                t = t.decode("utf-8")
            except UnicodeDecodeError:
                return f"text {i} is not valid UTF-8"
        if not isinstance(t, str):
            return f"text {i} is not a string ({type(t).__name__})"
        try:
            t.encode("utf-8")  # a JSON "\ud800" decodes to a lone surrogate: no UTF-8 text (Triton: 500)
        except UnicodeEncodeError:
            return f"text {i} is not valid UTF-8"
        if not t.strip():
            return f"text {i} is empty"
    return None


def check_request_fields(req: dict) -> str | None:
    """None if the request's `id`, `parameters` and `outputs` are as KServe v2 has them, else the
    message of a 400. Measured on Triton 2.51: each malformed one below was a 500, and `classification`
    on an output made tritonserver exit."""
    if "id" in req and not isinstance(req["id"], str):
        return f"the request 'id' must be a string, got {type(req['id']).__name__}"
    if not isinstance(req.get("parameters", {}), dict):
        return f"the request 'parameters' must be a JSON object, got {type(req['parameters']).__name__}"
    outputs = req.get("outputs", [])
    if not isinstance(outputs, list):
        return f"'outputs' must be a list of {{\"name\": ...}} objects, got {type(outputs).__name__}"
    for i, out in enumerate(outputs):
        if not (isinstance(out, dict) and isinstance(out.get("name"), str)):
            return f"output {i} must be an object with a 'name' (label or score), got {out!r}"[:300]
        params = out.get("parameters", {})
        if not isinstance(params, dict):
            return f"output '{out['name']}' parameters must be a JSON object, got {type(params).__name__}"
        if "classification" in params:
            return (f"output '{out['name']}': the classification extension is not served (it stops Triton on this "
                    f"model); the 'label' and 'score' outputs are the classification")
    return None


def canonical_path(path: str) -> str:
    """`path` (decoded) with repeated slashes, dot segments and a trailing slash resolved."""
    return posixpath.normpath(re.sub("/+", "/", path or "/"))


class Gateway:
    """aiohttp server on (host, port) in its own thread, forwarding to Triton at (upstream_host, upstream_port)
    (default: host; `serve` puts Triton's HTTP on 127.0.0.1 whatever --host)."""

    def __init__(self, host: str, port: int, upstream_port: int, model: str, input_name: str, max_batch_size: int,
                 upstream_host: str | None = None):
        from yarl import URL  # aiohttp's

        self.host, self.port, self.upstream = host, port, URL.build(scheme="http", host=upstream_host or host,
                                                                     port=upstream_port)
        self.model = model
        self.input_name, self.max_batch_size = input_name, max_batch_size
        self.loop = None
        self.thread = None
        self.ready = threading.Event()
        self.error = None

    async def _handle(self, request):
        import aiohttp
        from aiohttp import web

        def too_large():  # built only when needed, not for every request
            return web.json_response({"error": f"the request body is larger than {MAX_BODY_BYTES} bytes: send at most "
                                               f"{MAX_BODY_BYTES} bytes (split the texts over several requests)"}, status=413)

        if (request.content_length or 0) > MAX_BODY_BYTES:
            return too_large()
        try:
            body = await request.read()  # aiohttp has undone a Content-Encoding (gzip, deflate) already
        except web.HTTPRequestEntityTooLarge:  # client_max_size: the decompressed body, or a chunked one
            return too_large()
        if len(body) > MAX_BODY_BYTES:
            return too_large()
        path = canonical_path(request.path)
        infer = INFER_PATH.fullmatch(path)
        if request.method == "POST" and infer and infer["model"] == self.model:
            msg = check_infer_body(body, self.input_name, self.max_batch_size, request.headers.get(HEADER_LENGTH))
            if msg is not None:
                return web.json_response({"error": msg}, status=400)
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
        url = self.upstream.with_path(path).with_query(request.query_string)
        try:
            async with self.session.request(request.method, url, data=body or None, headers=headers) as resp:
                payload = await resp.read()
                out_headers = {k: v for k, v in resp.headers.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}
                return web.Response(body=payload, status=resp.status, headers=out_headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            # Triton gone (it exited; serve is stopping): measured before, aiohttp's text/plain 500 and a traceback per request
            return web.json_response({"error": f"Triton is not answering ({type(e).__name__}): the server is "
                                               f"stopping or has failed"}, status=502)

    async def _main(self):
        import aiohttp
        from aiohttp import web

        # The client's Accept-Encoding goes to Triton as is and a compressed answer comes back untouched:
        # no Accept-Encoding of aiohttp's own, no decompression here.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024, keepalive_timeout=60),
                                             auto_decompress=False, skip_auto_headers=("Accept-Encoding",))
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, backlog=1024)
        await site.start()
        self.stopping = asyncio.Event()
        self.ready.set()
        await self.stopping.wait()
        await self.runner.cleanup()
        await self.session.close()

    def _run(self):
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as e:  # reported to start()
            self.error = e
            self.ready.set()
        finally:
            self.loop.close()

    def start(self):
        self.thread = threading.Thread(target=self._run, name="http-gateway", daemon=True)
        self.thread.start()
        self.ready.wait(30)
        if self.error is not None:
            raise self.error

    def stop(self):
        if self.loop is not None and self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stopping.set)
            self.thread.join(15)
