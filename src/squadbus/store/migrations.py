"""Schema migrations of both engines: ``(version, statements)`` applied in order, once.

The ``schema_version`` table records applied versions. Both engines have the
same tables, columns and indexes; only types differ. ``pk`` is the stored
order (cursor key); ``exec_counters`` holds the last seq per execution
(``''`` = messages without one), updated in the writing transaction, so a seq
is never reused even after retention deletes rows. ``id_claims`` (version 2)
holds the claims on client-set ids made before publishing (see
:class:`~squadbus.store.base.ClaimsIds`), removed by retention with the
messages.
Version 3 gives each execution's counter row its ``task_execution_id`` (native
type) and ``last_at``, the ``stored_at`` of its newest message (the write
path keeps both; retention clears ``task_execution_id`` once all its rows are
gone), indexed for the newest-first execution list, and indexes
``messages (task_execution_id, message_type)`` for the list's type filter.
Version 4 adds ``dead_letters``: the messages published on ``agent.dlq.<group>``,
one row per dead-letter id, with their group, state (``dead``, ``redriven``,
``discarded``) and who settled them when (see :mod:`squadbus.store.dead_letters`).
"""

from __future__ import annotations

from collections.abc import Sequence

Migration = tuple[int, Sequence[str]]

SQLITE_MIGRATIONS: Sequence[Migration] = (
    (
        1,
        (
            """CREATE TABLE messages (
                pk INTEGER PRIMARY KEY AUTOINCREMENT,
                id BLOB NOT NULL UNIQUE,
                task_execution_id BLOB,
                seq INTEGER NOT NULL,
                sender_id TEXT NOT NULL,
                recipient_id TEXT,
                message_type TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                stored_at INTEGER NOT NULL,
                body BLOB NOT NULL
            )""",
            "CREATE UNIQUE INDEX messages_execution_seq ON messages (task_execution_id, seq)"
            " WHERE task_execution_id IS NOT NULL",
            "CREATE UNIQUE INDEX messages_no_execution_seq ON messages (seq) WHERE task_execution_id IS NULL",
            # SQLite appends the rowid (pk) to every index: these also serve ORDER BY pk.
            "CREATE INDEX messages_sender ON messages (sender_id)",
            "CREATE INDEX messages_recipient ON messages (recipient_id)",
            "CREATE INDEX messages_type ON messages (message_type)",
            "CREATE INDEX messages_created ON messages (created_at)",
            "CREATE INDEX messages_stored ON messages (stored_at)",
            "CREATE TABLE exec_counters (exec_key TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID",
        ),
    ),
    (
        2,
        (
            """CREATE TABLE id_claims (
                id BLOB PRIMARY KEY,
                sender_id TEXT NOT NULL,
                fingerprint BLOB NOT NULL,
                claimed_at INTEGER NOT NULL
            ) WITHOUT ROWID""",
            "CREATE INDEX id_claims_claimed ON id_claims (claimed_at)",
        ),
    ),
    (
        3,
        (
            "ALTER TABLE exec_counters ADD COLUMN task_execution_id BLOB",
            "ALTER TABLE exec_counters ADD COLUMN last_at INTEGER",
            """UPDATE exec_counters SET task_execution_id = m.e, last_at = m.t
            FROM (SELECT task_execution_id AS e, lower(hex(task_execution_id)) AS h, max(stored_at) AS t
                  FROM messages WHERE task_execution_id IS NOT NULL GROUP BY task_execution_id) AS m
            WHERE replace(exec_counters.exec_key, '-', '') = m.h""",
            "CREATE INDEX exec_counters_activity ON exec_counters (last_at, exec_key)"
            " WHERE task_execution_id IS NOT NULL",
            "CREATE INDEX messages_execution_type ON messages (task_execution_id, message_type)",
        ),
    ),
    (
        4,
        (
            """CREATE TABLE dead_letters (
                pk INTEGER PRIMARY KEY AUTOINCREMENT,
                id BLOB NOT NULL UNIQUE,
                grp TEXT NOT NULL,
                state TEXT NOT NULL,
                dead_at INTEGER NOT NULL,
                stored_at INTEGER NOT NULL,
                body BLOB NOT NULL,
                settled_at INTEGER,
                settled_by TEXT,
                redriven_as BLOB
            )""",
            "CREATE INDEX dead_letters_state_group ON dead_letters (state, grp)",
            "CREATE INDEX dead_letters_group ON dead_letters (grp)",
            "CREATE INDEX dead_letters_dead_at ON dead_letters (dead_at)",
        ),
    ),
)

POSTGRES_MIGRATIONS: Sequence[Migration] = (
    (
        1,
        (
            """CREATE TABLE messages (
                pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                id uuid NOT NULL UNIQUE,
                task_execution_id uuid,
                seq bigint NOT NULL,
                sender_id text NOT NULL,
                recipient_id text,
                message_type text NOT NULL,
                created_at timestamptz NOT NULL,
                stored_at timestamptz NOT NULL,
                body bytea NOT NULL
            )""",
            "CREATE UNIQUE INDEX messages_execution_seq ON messages (task_execution_id, seq)"
            " WHERE task_execution_id IS NOT NULL",
            "CREATE UNIQUE INDEX messages_no_execution_seq ON messages (seq) WHERE task_execution_id IS NULL",
            "CREATE INDEX messages_sender ON messages (sender_id, pk)",
            "CREATE INDEX messages_recipient ON messages (recipient_id, pk)",
            "CREATE INDEX messages_type ON messages (message_type, pk)",
            "CREATE INDEX messages_created ON messages (created_at)",
            "CREATE INDEX messages_stored ON messages (stored_at)",
            "CREATE TABLE exec_counters (exec_key text PRIMARY KEY, last_seq bigint NOT NULL)",
        ),
    ),
    (
        2,
        (
            """CREATE TABLE id_claims (
                id uuid PRIMARY KEY,
                sender_id text NOT NULL,
                fingerprint bytea NOT NULL,
                claimed_at timestamptz NOT NULL
            )""",
            "CREATE INDEX id_claims_claimed ON id_claims (claimed_at)",
        ),
    ),
    (
        3,
        (
            "ALTER TABLE exec_counters ADD COLUMN task_execution_id uuid, ADD COLUMN last_at timestamptz",
            """UPDATE exec_counters AS ec SET task_execution_id = m.e, last_at = m.t
            FROM (SELECT task_execution_id AS e, max(stored_at) AS t
                  FROM messages WHERE task_execution_id IS NOT NULL GROUP BY task_execution_id) AS m
            WHERE ec.exec_key = m.e::text""",
            "CREATE INDEX exec_counters_activity ON exec_counters (last_at, exec_key)"
            " WHERE task_execution_id IS NOT NULL",
            "CREATE INDEX messages_execution_type ON messages (task_execution_id, message_type)",
        ),
    ),
    (
        4,
        (
            """CREATE TABLE dead_letters (
                pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                id uuid NOT NULL UNIQUE,
                grp text NOT NULL,
                state text NOT NULL,
                dead_at timestamptz NOT NULL,
                stored_at timestamptz NOT NULL,
                body bytea NOT NULL,
                settled_at timestamptz,
                settled_by text,
                redriven_as uuid
            )""",
            "CREATE INDEX dead_letters_state_group ON dead_letters (state, grp, pk)",
            "CREATE INDEX dead_letters_group ON dead_letters (grp, pk)",
            "CREATE INDEX dead_letters_dead_at ON dead_letters (dead_at)",
        ),
    ),
)
