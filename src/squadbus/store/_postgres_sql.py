"""The SQL of the PostgreSQL store's write paths (see :mod:`squadbus.store.postgres`)."""

from __future__ import annotations

LOCK_COUNTERS = """
INSERT INTO exec_counters AS ec (exec_key, last_seq)
SELECT k, 0 FROM unnest($1::text[]) AS k ORDER BY k
ON CONFLICT (exec_key) DO UPDATE SET last_seq = ec.last_seq
RETURNING exec_key, last_seq
"""
RESERVE_SEQS = """
WITH now AS (SELECT clock_timestamp() AS ts)
INSERT INTO exec_counters AS ec (exec_key, last_seq, task_execution_id, last_at)
SELECT u.k, u.n, nullif(u.k, '')::uuid, (SELECT ts FROM now)
FROM unnest($1::text[], $2::bigint[]) AS u(k, n) ORDER BY u.k
ON CONFLICT (exec_key) DO UPDATE SET last_seq = ec.last_seq + EXCLUDED.last_seq,
    task_execution_id = EXCLUDED.task_execution_id, last_at = greatest(ec.last_at, EXCLUDED.last_at)
RETURNING exec_key, last_seq, (SELECT ts FROM now)
"""
COPY_COLUMNS = ("id", "task_execution_id", "seq", "sender_id", "recipient_id", "message_type", "created_at",
                "stored_at", "body")
EXISTING = "SELECT id, seq, stored_at, body FROM messages WHERE id = ANY($1::uuid[])"
INSERT = """
INSERT INTO messages (id, task_execution_id, seq, sender_id, recipient_id, message_type, created_at, stored_at, body)
SELECT u.i, u.e, u.s, u.snd, u.rcp, u.t, u.c, now.ts, u.b
FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::timestamptz[], $8::bytea[])
     AS u(i, e, s, snd, rcp, t, c, b),
     (SELECT clock_timestamp() AS ts) AS now
ON CONFLICT (id) DO NOTHING
RETURNING id, stored_at
"""
FAST_WRITE = """
WITH now AS (SELECT clock_timestamp() AS ts), batch AS (
    SELECT u.*, row_number() OVER (PARTITION BY u.k ORDER BY u.ord) AS rn,
           count(*) OVER (PARTITION BY u.k) AS cnt
    FROM (
        SELECT v.*, coalesce(v.e::text, '') AS k
        FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::bytea[])
             WITH ORDINALITY AS v(i, e, snd, rcp, t, c, b, ord)
    ) AS u
), counters AS (
    INSERT INTO exec_counters AS ec (exec_key, last_seq, task_execution_id, last_at)
    SELECT k, count(*), e, (SELECT ts FROM now) FROM batch GROUP BY k, e ORDER BY k
    ON CONFLICT (exec_key) DO UPDATE SET last_seq = ec.last_seq + EXCLUDED.last_seq,
        task_execution_id = EXCLUDED.task_execution_id, last_at = greatest(ec.last_at, EXCLUDED.last_at)
    RETURNING exec_key, last_seq
)
INSERT INTO messages (id, task_execution_id, seq, sender_id, recipient_id, message_type, created_at, stored_at, body)
SELECT b.i, b.e, counters.last_seq - b.cnt + b.rn, b.snd, b.rcp, b.t, b.c, (SELECT ts FROM now), b.b
FROM batch AS b JOIN counters ON counters.exec_key = b.k
ORDER BY b.ord
ON CONFLICT (id) DO NOTHING
RETURNING id, seq, stored_at
"""
SAVE_COUNTERS = """
UPDATE exec_counters AS ec SET last_seq = u.s, task_execution_id = nullif(u.k, '')::uuid,
    last_at = greatest(ec.last_at, $3::timestamptz)
FROM unnest($1::text[], $2::bigint[]) AS u(k, s) WHERE ec.exec_key = u.k
"""
RETIRE_EXECUTIONS = """
UPDATE exec_counters SET task_execution_id = NULL WHERE exec_key IN (
    SELECT exec_key FROM exec_counters WHERE task_execution_id IS NOT NULL AND last_at < $1
    ORDER BY exec_key FOR UPDATE
)
"""
CLAIM = """
INSERT INTO id_claims (id, sender_id, fingerprint, claimed_at)
SELECT u.i, u.s, u.f, clock_timestamp()
FROM unnest($1::uuid[], $2::text[], $3::bytea[]) AS u(i, s, f)
ORDER BY u.i
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
CLAIMS_HELD = "SELECT id, sender_id, fingerprint FROM id_claims WHERE id = ANY($1::uuid[])"
UNCLAIM = "DELETE FROM id_claims WHERE id = ANY($1::uuid[])"
RECLAIM = """
UPDATE id_claims AS ic SET sender_id = u.s, fingerprint = u.f
FROM unnest($1::uuid[], $2::text[], $3::bytea[]) AS u(i, s, f) WHERE ic.id = u.i
"""
