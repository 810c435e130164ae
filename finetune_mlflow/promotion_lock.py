"""One alias move at a time per registered model, across machines that share a tracking store.

MLflow aliases have no compare-and-swap, but creating a registered model is atomic in every store (a unique name:
the database's own constraint behind a tracking server, a directory create in a file store). The lock is the
registered model `<name>.promote-lock`: whoever creates it holds it, for the few store calls that re-read the
champion and move the aliases, and deletes it after. Its tags name the holder (`finetune.owner` host:pid, and the
time it was taken): a holder that is gone (its pid on this machine, or a lock older than
`ownership.STALE_SECONDS` from another machine) is broken. Two processes breaking the same stale lock at the same
instant can still both get in; every other interleaving has exactly one holder.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.ownership import HEARTBEAT_TAG, OWNER_TAG, me, owner_alive

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".promote-lock"
RUN_TAG = "finetune.promote_run"
# A live holder moves aliases in a few store calls; one that keeps the lock this long is stuck, not busy.
WAIT_SECONDS = 120.0


class PromotionLost(FinetuneError):
    """Another promotion holds the model, or moved its champion while this one was deciding."""


def lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


def _holder(client: MlflowClient, lock: str) -> dict[str, str] | None:
    try:
        return dict(client.get_registered_model(lock).tags)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise


def _try_take(client: MlflowClient, lock: str, tags: dict[str, str]) -> bool:
    try:
        client.create_registered_model(lock, tags=tags, description=(
            f"Lock held by a promote run ({tags[RUN_TAG]}) while it moves aliases; deleted when it is done. A lock "
            "whose holder is gone is broken by the next promote."))
    except MlflowException as e:
        if e.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise
    # Read back: a store without an atomic create (a file store on a shared disk) shows here who really has it.
    return (_holder(client, lock) or {}).get(RUN_TAG) == tags[RUN_TAG]


def _say(line: str) -> None:
    print(line, flush=True)


@contextlib.contextmanager
def promotion_lock(client: MlflowClient, name: str, run_id: str, *, say: Callable[[str], None] = _say,
                   sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic
                   ) -> Iterator[None]:
    """Hold `name`'s promotion lock for the block, waiting while a live holder has it (each change of holder
    said once); raises PromotionLost when a live holder keeps it past WAIT_SECONDS."""
    lock = lock_name(name)
    tags = {OWNER_TAG: me(), HEARTBEAT_TAG: f"{time.time():.0f}", RUN_TAG: run_id}
    deadline, seen = clock() + WAIT_SECONDS, ""
    while not _try_take(client, lock, tags):
        holder = _holder(client, lock)
        if holder is None:
            continue  # released between our create and our read
        if not owner_alive(holder):
            logger.warning("breaking the promotion lock of %s left by %s (promote run %s), which is gone", name,
                           holder.get(OWNER_TAG, "?"), holder.get(RUN_TAG, "?"))
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
            continue
        if clock() > deadline:
            raise PromotionLost(f"{name} is being promoted by {holder.get(OWNER_TAG)} (promote run "
                                f"{holder.get(RUN_TAG)}) and it has held the lock for over {WAIT_SECONDS:.0f} s; "
                                f"nothing was changed: rerun promote when it ends")
        if holder.get(OWNER_TAG) != seen:
            seen = holder.get(OWNER_TAG, "")
            say(f"{name}: waiting for the promotion held by {seen} (promote run {holder.get(RUN_TAG)})")
        sleep(0.2)
    try:
        yield
    finally:
        if (_holder(client, lock) or {}).get(RUN_TAG) == run_id:
            client.delete_registered_model(lock)
