"""What one 429 of a saturated server costs the event loop, per path, in-process (no sockets, no client).

Under overload most requests are refused, on the cores that run the model, so the price of a refusal decides how
much of the device is left (docs/reliability.md, "Overload"). This builds the server as `fewstep serve` does
(`create_app` + `build_server`, the models of --models loaded, no warm-up), marks its engine saturated, and feeds
the real protocol object a refused request over and over through an in-memory transport:

- at the wire: the whole request in one read, answered before h11 (server/rejection.py, ``at_the_wire``);
- through h11: the head and the body in two reads, so the head alone reaches h11 and ``RefusingConnection``
  answers it (what a client that writes its head and body separately meets).

Both answers are checked to be the same bytes. Prints a Markdown table: microseconds per refusal, and the ratio.

    python benchmarks/refusal.py [--models zoo] [--n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from uvicorn.server import ServerState

from fewstep.server.api import create_app
from fewstep.server.lifecycle import build_server
from fewstep.server.settings import ServeSettings

KEY = "bench-key"


class MemoryTransport(asyncio.Transport):
    """Collects what the protocol writes; never pauses, never closes on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def request(body: bytes) -> tuple[bytes, bytes]:
    head = (
        "POST /v1/generate HTTP/1.1\r\nhost: 127.0.0.1:8000\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {KEY}\r\nx-request-id: bench-1\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def per_refusal_us(protocol, transport: MemoryTransport, reads: list[bytes], n: int) -> tuple[float, bytes]:
    for _ in range(min(200, n)):  # warm up
        for data in reads:
            protocol.data_received(data)
    transport.written.clear()
    t0 = time.perf_counter()
    for _ in range(n):
        for data in reads:
            protocol.data_received(data)
    elapsed = time.perf_counter() - t0
    assert len(transport.written) == n and len(set(transport.written)) == 1, "not one same answer per request"
    return 1e6 * elapsed / n, transport.written[0]


async def run(models: Path, n: int) -> list[tuple[str, float, bytes]]:
    settings = ServeSettings(models=models, device="cpu", warmup=False, log_level="warning", api_keys=[KEY])
    app = create_app(settings)
    config = build_server(app, settings).config
    config.load()
    app.state.engine.saturated = lambda: True  # a full queue, without the work that would fill it
    head, body = request(json.dumps({"prompt": "a red 7 on black", "steps": 1}).encode())
    rows = []
    for name, reads in (("at the wire (whole request in one read)", [head + body]),
                        ("through h11 (head and body in two reads)", [head, body])):  # fmt: skip
        transport = MemoryTransport()
        protocol = config.http_protocol_class(
            config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
        )
        protocol.connection_made(transport)
        us, answer = per_refusal_us(protocol, transport, reads, n)
        protocol.connection_lost(None)
        rows.append((name, us, answer))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("zoo"), help="models directory (default ./zoo)")
    p.add_argument("--n", type=int, default=5000, help="refusals timed per path (default 5000)")
    args = p.parse_args()
    rows = asyncio.run(run(args.models, args.n))
    answers = {answer for _, _, answer in rows}
    assert len(answers) == 1 and next(iter(answers)).startswith(b"HTTP/1.1 429 "), answers
    print("| path | µs per refusal | vs the wire |")
    print("|---|---:|---:|")
    for name, us, _ in rows:
        print(f"| {name} | {us:.1f} | {us / rows[0][1]:.1f}× |")
    print(f"\n{args.n} refusals per path; both paths answered the same {len(rows[0][2])} bytes (a 429).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
