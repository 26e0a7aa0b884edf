#!/usr/bin/env python3
"""delay_proxy.py LISTEN_PORT TARGET_HOST:PORT ONE_WAY_DELAY_MS

A TCP proxy that adds a fixed one-way delay to every byte in both directions (so a round
trip costs twice the delay), keeping order. `tc netem` is not available on these machines;
bandwidth is limited separately with `tc tbf` on the network namespace's loopback.
Prints "ready" once listening.
"""
import asyncio
import sys


async def pipe(reader, writer, delay):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def forward():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass

    task = asyncio.create_task(forward())
    try:
        while True:
            data = await reader.read(65536)
            await queue.put((loop.time() + delay, data or None))
            if not data:
                break
    except (ConnectionError, OSError):
        await queue.put((loop.time(), None))
    try:
        await task
    except (ConnectionError, OSError):
        pass


async def main():
    port, target, delay_ms = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    host, tport = target.rsplit(":", 1)
    delay = delay_ms / 1000.0

    async def handle(cr, cw):
        try:
            ur, uw = await asyncio.open_connection(host, int(tport))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw, delay), pipe(ur, cw, delay))
        for w in (cw, uw):
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
