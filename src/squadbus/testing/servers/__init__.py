"""Start real servers (Redis, NATS, tansu, PostgreSQL) as private processes for tests and benchmarks.

Every server binds 127.0.0.1 on a free port, lives in a temp dir, and is
stopped by its PID. A missing binary raises :class:`ServerUnavailable`
(never a skip): CI must fail when a server it needs is not installed.
"""
