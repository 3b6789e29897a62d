"""The baseline of ``make bench`` (b): the plain aiohttp handler a Python user would write.

Each POST body is published with aio-pika to an exchange, persistent, and the handler awaits the
broker's confirm before answering 200. No signature check, no parsing: the bare minimum.

    python tests/bench/baseline.py AMQP_URL EXCHANGE PORT
"""

from __future__ import annotations

import sys

import aio_pika
from aiohttp import web


async def make_app(url: str, exchange_name: str) -> web.Application:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(exchange_name)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        await exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="baseline.none",
        )
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/webhook", handle)
    return app


if __name__ == "__main__":
    amqp_url, exchange, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    web.run_app(
        make_app(amqp_url, exchange), host="127.0.0.1", port=port, print=None, access_log=None
    )
