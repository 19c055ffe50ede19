"""`flashrun status`: one snapshot of a running job from its coordinator."""

from __future__ import annotations

import json
from typing import Any

from flashrun.config import Endpoint
from flashrun.errors import EXIT_JOB_FAILED, FlashrunError

STATUS_TIMEOUT_S = 5.0
"""How long `flashrun status` waits for the coordinator to answer."""


def fetch_status(endpoint: Endpoint, token: str, timeout_s: float = STATUS_TIMEOUT_S,
                 max_ranks: int = 0) -> dict[str, Any]:
    """One snapshot (see Job.snapshot); `max_ranks` > 0 lists only ranks not plainly running, at most that many."""
    import grpc

    from flashrun._proto import flashrun_pb2 as pb
    from flashrun._proto import flashrun_pb2_grpc as pb_grpc

    with grpc.insecure_channel(str(endpoint)) as channel:
        try:
            reply = pb_grpc.CoordinatorStub(channel).GetStatus(
                pb.StatusRequest(token=token, max_ranks=max_ranks), timeout=timeout_s)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.PERMISSION_DENIED:  # type: ignore[attr-defined]
                raise FlashrunError(f"the coordinator at {endpoint} refused: {err.details()}") from None  # type: ignore[attr-defined]
            raise FlashrunError(
                f"no coordinator answered at {endpoint} within {timeout_s:g} s: check --rdzv-endpoint",
                EXIT_JOB_FAILED,
            ) from None
    return json.loads(reply.json)


def format_status(snapshot: dict[str, Any]) -> str:
    lines = [
        f"run {snapshot['run_id']}  phase {snapshot['phase']}  generation {snapshot['generation']}  "
        f"restarts {snapshot['restarts']}  world {snapshot['world_size']}",
        f"{'rank':>5} {'node':>4} {'host':<16} {'pid':>7} {'state':<12} {'step':>7} {'steps/s':>8} {'hb age':>7}",
    ]
    for r in snapshot["ranks"]:
        age = f"{r['heartbeat_age_s']:.2f}" if r["heartbeat_age_s"] >= 0 else "-"
        lines.append(f"{r['rank']:>5} {r['node']:>4} {r['host'][:16]:<16} {r['pid']:>7} {r['state']:<12} "
                     f"{r['step']:>7} {r['steps_per_s']:>8.2f} {age:>7}")
    return "\n".join(lines)
