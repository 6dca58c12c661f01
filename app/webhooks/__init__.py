"""Threshold webhooks: a commit that takes a coach's usage past 70 %, 90 % or all of the
allowance records one delivery per configured endpoint in the same Redis script call,
and the service processes deliver them, signed per Standard Webhooks.

- ``config``: ``CREDITS_WEBHOOKS`` and the retry schedule, checked at start-up;
- ``outbox``: the per-slot outboxes in Redis: what a commit passes, claiming and
  finishing an attempt, the slot indexes, reading deliveries back;
- ``signing``: the body and the signed headers of one attempt;
- ``dispatcher``: sends attempts in the background, off the request path;
- ``sweeper``: the one process holding the lease finds due retries and what a dead
  process left;
- ``runtime``: the above wired together for the app's lifespan.
"""
