"""events-bridge: Adobe I/O Events webhooks in, confirmed RabbitMQ messages out."""

__version__ = "0.1.0"
