"""A minimal aiosmtpd sink: accepts every sender and recipient, discards the message.

Run: ``python aiosmtpd_sink.py --port 2527``. The hostname is given explicitly: without it
aiosmtpd calls ``socket.getfqdn()`` for every connection.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


class Sink:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK: discarded"


async def serve(host: str, port: int, hostname: str) -> None:
    loop = asyncio.get_running_loop()
    handler = Sink()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=hostname, ident="aiosmtpd sink"), host, port
    )
    print(f"aiosmtpd sink on {host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--hostname", default="bench.test", help="name in the greeting")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.hostname))


if __name__ == "__main__":
    main()
