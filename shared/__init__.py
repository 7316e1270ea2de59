"""The render farm's domain: plain functions that take a session and never commit.

Platform modules, at this level, import no package below:
`settings` (the one typed settings object), `db` (engines, sessions, transactions),
`clock` (the database's time, which decides leases, deadlines and retention),
`models` (the tables and their state predicates), `errors` (domain errors and the one
conversion of validation errors), `storage` (local disk or S3), `links` (signed image
links), `redis_client`, `celery_app`, `logs`, `migrate`.

Packages, each importing only those before it:
`scheduling` (fair share, lines and queues, release order, positions, the fleet),
`accounts` (tenants, users, keys, ledger, pricing, history, admin),
`webhooks` (URL guard, secrets, outbox, delivery),
`metrics` (counters and scrape-time readings),
`jobs` (the request schema, every state change and its after-commit effects, the
submission flow, status reads, bodies, cache, idempotency).

`resources` wires the settings into each process's clients, the session factory's
after-commit publisher included, so it alone sits above every package.
`tests/test_boundaries.py` holds them to that order.
"""
