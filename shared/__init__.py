"""The render farm's domain: plain functions that take a session and never commit.

Platform modules, at this level, import no package below:
`settings` (the one typed settings object), `db` (engines, sessions, transactions),
`models` (the tables and their state predicates), `errors` (domain errors), `storage`
(local disk or S3), `links` (signed image links), `redis_client`, `celery_app`,
`resources` (wires settings into those clients), `migrate`.

Packages, each importing only those before it:
`scheduling` (fair share, lines and queues, release order, positions, the fleet),
`accounts` (tenants, users, keys, ledger, pricing, history, admin),
`webhooks` (URL guard, secrets, outbox, delivery),
`metrics` (counters and scrape-time readings),
`jobs` (the request schema, every state change, reads, bodies, cache, idempotency).
`tests/test_boundaries.py` holds them to that order.
"""
