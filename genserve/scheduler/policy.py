"""Which queued jobs a worker runs next, and together. Pure functions over store records; no torch.

The policy, in order:
1. Queue. Jobs are short or long (classified at submit by the cost model). When both queues hold
   work, a deficit counter gives the long queue `long_share` of the batches, so neither starves.
2. Priority, then fairness. Within the chosen queue the highest priority present goes first; among
   jobs of that priority, client identities take turns (round-robin), each client's oldest job first.
3. Batch. The chosen head job is joined by queued jobs with the same batch key (model, size, steps,
   sampler) from any client and either queue, oldest first, up to the batch limit in images.
   Grouping by key also groups by model, so a worker does not thrash between models.

The batch "window" is the previous batch: an idle worker claims a job the moment it is queued, and
jobs that arrive while the GPU is busy are batched when it is free again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from genserve.schemas.generation import GenerationParams, batch_key
from genserve.store.jobs import JobRecord

SHORT, LONG = "short", "long"
ANONYMOUS = "-"


def classify(estimated_seconds: float | None, long_threshold_seconds: float) -> str:
    """Short unless the estimate says the job takes longer than the threshold."""
    if estimated_seconds is not None and estimated_seconds > long_threshold_seconds:
        return LONG
    return SHORT


@dataclass
class SchedulerState:
    """What one worker remembers between decisions: queue deficits and whose turn it is."""

    served: dict[str, int] = field(default_factory=lambda: {SHORT: 0, LONG: 0})
    last_client: dict[str, str] = field(default_factory=dict)


def choose_queue(has_short: bool, has_long: bool, state: SchedulerState, long_share: float) -> str | None:
    """Deficit round-robin: the long queue gets `long_share` of the picks while both have work."""
    if has_short and has_long:
        total = state.served[SHORT] + state.served[LONG]
        return LONG if state.served[LONG] < long_share * (total + 1) else SHORT
    if has_short:
        return SHORT
    if has_long:
        return LONG
    return None


def next_head(queued: Sequence[JobRecord], last_client: str | None) -> JobRecord:
    """Highest priority first; among those, the next client after `last_client`, oldest job first."""
    top = max(job.priority for job in queued)
    oldest_by_client: dict[str, JobRecord] = {}
    for job in queued:  # the store lists by (priority desc, arrival), so the first seen is the oldest
        if job.priority == top:
            oldest_by_client.setdefault(job.client_id or ANONYMOUS, job)
    clients = sorted(oldest_by_client)
    if last_client is not None:
        later = [client for client in clients if client > last_client]
        clients = later + [client for client in clients if client <= last_client]
    return oldest_by_client[clients[0]]


def fill_batch(head: JobRecord, queued: Sequence[JobRecord], max_images: int) -> list[JobRecord]:
    """The head plus compatible queued jobs in queue order, while the batch has room (in images).
    A video or a segment of one runs alone: its frames are the batch."""
    if head.kind != "image":
        return [head]
    key = batch_key(GenerationParams.model_validate(head.params))
    batch, images = [head], head.params["num_images"]
    for job in queued:
        if job.id == head.id or images >= max_images or job.kind != "image":
            continue
        if batch_key(GenerationParams.model_validate(job.params)) != key:
            continue
        if images + job.params["num_images"] <= max_images:
            batch.append(job)
            images += job.params["num_images"]
    return batch


def plan_batch(
    queued: Sequence[JobRecord],
    state: SchedulerState,
    *,
    long_share: float,
    max_images: Callable[[GenerationParams], int],
) -> list[JobRecord]:
    """The next batch to claim from the queue head (empty when nothing is queued)."""
    by_queue = {
        SHORT: [job for job in queued if job.queue != LONG],
        LONG: [job for job in queued if job.queue == LONG],
    }
    queue = choose_queue(bool(by_queue[SHORT]), bool(by_queue[LONG]), state, long_share)
    if queue is None:
        return []
    head = next_head(by_queue[queue], state.last_client.get(queue))
    if head.kind != "image":
        return [head]
    return fill_batch(head, queued, max_images(GenerationParams.model_validate(head.params)))


def record_served(state: SchedulerState, head: JobRecord) -> None:
    """Advance the deficit counters and the client rotation after `head`'s batch was claimed."""
    queue = LONG if head.queue == LONG else SHORT
    state.served[queue] += 1
    state.last_client[queue] = head.client_id or ANONYMOUS


def batch_limit(limits: dict[str, int], params: GenerationParams, estimate: int | None, fallback: int) -> int:
    """The configured limit for this model and size, else the VRAM estimate, else `fallback`.

    Keys, most specific first: "model@WxH", "model", "*@WxH", "*".
    """
    size = f"{params.width}x{params.height}"
    for key in (f"{params.model}@{size}", f"{params.model}", f"*@{size}", "*"):
        if key in limits:
            return max(1, limits[key])
    return max(1, estimate if estimate is not None else fallback)
