"""`flashrun inject`: fault drills on a running job, sent to its coordinator (the faults themselves are named here)."""

from __future__ import annotations

from flashrun.config import Endpoint
from flashrun.errors import EXIT_JOB_FAILED, FlashrunError

RANK_FAULTS = ("kill", "stop", "hang", "exception")
"""Faults aimed at one rank: SIGKILL, SIGSTOP, a hang in the step loop, an exception raised in the step loop."""
STEP_LOOP_FAULTS = ("hang", "exception")
"""Faults only flashrun's step loop (`run.steps()`) can fire; kill and stop need it only with --at-step."""
NODE_FAULT = "kill-node"
"""The whole node: its agent kills its workers and exits without a word, as a lost machine would."""
INJECT_TIMEOUT_S = 5.0
"""How long `flashrun inject` waits for the coordinator to answer."""
REFUSALS = ("PERMISSION_DENIED", "INVALID_ARGUMENT", "FAILED_PRECONDITION")
"""The gRPC codes a coordinator refuses a drill with; its reason comes along."""


def send_fault(endpoint: Endpoint, token: str, fault: str, rank: int | None = None, node: int | None = None,
               at_step: int | None = None, timeout_s: float = INJECT_TIMEOUT_S) -> str:
    """Ask the coordinator at `endpoint` to inject `fault`; returns what it did, raises FlashrunError if refused."""
    import grpc

    from flashrun._proto import flashrun_pb2 as pb
    from flashrun._proto import flashrun_pb2_grpc as pb_grpc

    request = pb.InjectRequest(token=token, fault=fault, rank=-1 if rank is None else rank,
                               node=-1 if node is None else node, at_step=-1 if at_step is None else at_step)
    with grpc.insecure_channel(str(endpoint)) as channel:
        try:
            reply = pb_grpc.CoordinatorStub(channel).Inject(request, timeout=timeout_s)
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            if code.name in REFUSALS:
                raise FlashrunError(f"the coordinator at {endpoint} refused: {err.details()}",  # type: ignore[attr-defined]
                                    EXIT_JOB_FAILED) from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise FlashrunError(f"the coordinator at {endpoint} runs a flashrun without fault drills; "
                                    "upgrade it", EXIT_JOB_FAILED) from None
            raise FlashrunError(f"no coordinator answered at {endpoint} ({code.name}): check --rdzv-endpoint and "
                                "that the job is still running", EXIT_JOB_FAILED) from None
    return reply.detail
