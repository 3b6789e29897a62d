"""Adobe I/O Events' wire protocol, pure: no sockets, no event loop, no aiohttp or aio_pika.

``signature`` checks the RSA signatures over the raw body, ``envelope`` turns a verified body
into events, ``jobstatus`` folds an Imaging job-status body into one status word.
"""
