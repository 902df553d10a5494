"""The whole of a backend: serves items/{id} and notifies a change.

Run a node (cargo run --release -- --grpc-addr 127.0.0.1:50051), then
python examples/quickstart.py [NODE_URL]; Ctrl-C drains and stops it.
"""

import asyncio
import signal
import sys

from entity_sync import Answer, Entity, FetchMode, Notifier, ResolveRequest, serve


async def items(req: ResolveRequest) -> dict[str, Answer]:
    """Rows of items/{id}: from memory here; a real backend queries its database."""
    rows = {"101": {"id": 101, "name": "milk", "qty": 2}}
    return {id: Answer.row(rows[id]) if id in rows else Answer.not_found() for id in req.ids}


async def main(node: str) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    # Serves until Ctrl-C; registers again by itself whenever the node restarts.
    serving = asyncio.create_task(
        serve(node, {"items": Entity(items, FetchMode.SHARED)}, name="grocery", shutdown=stop)
    )
    # After a change in the database: every subscriber of items/101 is pushed.
    async with Notifier(node) as notifier:
        receipt = await notifier.notify([("items", 101)])
    print(f"notified, bus sequence {receipt.sequences[0]}", flush=True)
    await serving


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:50051"))
