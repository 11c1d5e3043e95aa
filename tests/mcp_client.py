"""Drives `hearth mcp` with the official MCP Python SDK (PyPI: mcp), as an assistant's client would.

Run by tests/mcp.rs (`a_real_mcp_client_follows_builds_longer_than_its_timeout`) with:
  mcp_client.py HEARTH_BIN GATE_DIR -- ARGS FOR hearth mcp...
Prints one JSON line of findings; exits non-zero on the first failed expectation.
"""

import asyncio
import json
import pathlib
import sys
import time
from datetime import timedelta

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

CLIENT_TIMEOUT = 3.0


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")


async def main():
    hearth, gate = sys.argv[1], pathlib.Path(sys.argv[2])
    server_args = sys.argv[sys.argv.index("--") + 1 :]
    params = StdioServerParameters(command=hearth, args=["mcp", *server_args], env={"NO_COLOR": "1"})
    found = {}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            check(init.serverInfo.name == "hearth", f"server name {init.serverInfo.name}")
            found["server"] = f"{init.serverInfo.name} {init.serverInfo.version}"

            tools = (await session.list_tools()).tools
            names = {t.name for t in tools}
            check({"list_repos", "build", "build_status", "cache_status"} <= names, f"tools {names}")
            for t in tools:
                for arg, schema in (t.inputSchema.get("properties") or {}).items():
                    check(schema.get("description"), f"{t.name}.{arg} has no description")

            # 1. Waiting, with progress: the first notification opens the gate.
            progress = []

            async def on_progress(value, total, message):
                progress.append(message)
                (gate / "one").touch()

            result = await session.call_tool(
                "build",
                {"repo": "fleet", "target": "gated1"},
                read_timeout_seconds=timedelta(seconds=120),
                progress_callback=on_progress,
            )
            check(not result.isError, f"build gated1: {result.content}")
            reply = json.loads(result.content[0].text)
            check(reply["status"] == "completed", f"gated1: {reply}")
            check(len(progress) >= 2, f"progress notifications: {progress}")
            found["progress"] = progress

            # 2. Not waiting: a build longer than this client's request timeout.
            started = time.monotonic()
            result = await session.call_tool(
                "build",
                {"repo": "fleet", "target": "gated2", "wait": False},
                read_timeout_seconds=timedelta(seconds=CLIENT_TIMEOUT),
            )
            check(not result.isError, f"build gated2: {result.content}")
            build_id = json.loads(result.content[0].text)["build_id"]
            while True:
                status = await session.call_tool(
                    "build_status", {"build_id": build_id}, read_timeout_seconds=timedelta(seconds=CLIENT_TIMEOUT)
                )
                state = json.loads(status.content[0].text)
                if state["state"] != "running":
                    break
                # The build outlasts the client's timeout before it may end.
                if time.monotonic() - started > CLIENT_TIMEOUT * 1.5:
                    (gate / "two").touch()
                await asyncio.sleep(0.3)
            elapsed = time.monotonic() - started
            check(state["state"] == "completed", f"gated2: {state}")
            check(elapsed > CLIENT_TIMEOUT, f"the build took only {elapsed:.1f}s")
            check(state["result"]["out_path"].endswith("-gated2"), f"gated2 result: {state}")
            found["long_build_seconds"] = round(elapsed, 1)
            found["recent_progress"] = state["recent_progress"]
    print(json.dumps(found))


asyncio.run(main())
