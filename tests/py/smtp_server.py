"""A real SMTP server (aiosmtpd) that requires STARTTLS and saves every message it accepts.

Usage: smtp_server.py CERT KEY OUTDIR
Prints `listening on PORT`; each message goes to OUTDIR/N.eml, with `X-Test-TLS: yes` added when
it came over TLS (it always must: MAIL before STARTTLS is refused).
"""
import asyncio
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP

cert, key, outdir = sys.argv[1:4]
count = 0


class Handler:
    async def handle_DATA(self, server, session, envelope):
        global count
        count += 1
        tls = "yes" if session.ssl is not None else "no"
        path = os.path.join(outdir, f"{count}.eml")
        with open(path + ".tmp", "wb") as f:
            f.write(f"X-Test-TLS: {tls}\r\nX-Test-Rcpt: {','.join(envelope.rcpt_tos)}\r\n".encode())
            f.write(envelope.original_content or envelope.content)
        os.rename(path + ".tmp", path)
        return "250 OK"


async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Handler(), tls_context=ctx, require_starttls=True, hostname="localhost"),
        "127.0.0.1",
        0,
    )
    print("listening on", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


asyncio.run(main())
