//! Schema and migrations, versioned by `PRAGMA user_version`.
//!
//! Each migration runs in its own transaction together with the bump of
//! `user_version`, so a power cut mid-migration leaves the previous version.
//! A database newer than this binary is refused rather than "upgraded
//! backwards": after an A/B rollback the old slot's binary may meet a file
//! the new slot migrated, and guessing there loses data.

/// `PRAGMA application_id`: "KNSL". Marks the file as ours, so pointing
/// `storage.path` at another program's SQLite file fails before any write.
pub const APPLICATION_ID: i32 = 0x4B4E_534C;

pub const MIGRATIONS: &[&str] = &[
    // 1: replicated records, the outbox, local-only service health.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;

    -- One row per replicated record (service, KV entry, device, ...). The
    -- body is the record's JSON; deletes keep the row as a tombstone so the
    -- delete itself can replicate.
    CREATE TABLE records (
        kind         TEXT    NOT NULL,
        key          TEXT    NOT NULL,
        name         TEXT,
        body         TEXT    NOT NULL,
        hlc          INTEGER NOT NULL,
        origin       TEXT    NOT NULL,
        vv           TEXT    NOT NULL,
        tombstone    INTEGER NOT NULL DEFAULT 0,
        create_index INTEGER NOT NULL,
        modify_index INTEGER NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;
    CREATE INDEX records_by_name ON records (kind, name) WHERE name IS NOT NULL;

    -- Keys changed since the cloud last acknowledged them. One row per key:
    -- a newer change replaces the row (and its seq), so the queue coalesces
    -- and never has to drop a state change.
    CREATE TABLE outbox (
        seq  INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        key  TEXT NOT NULL,
        UNIQUE (kind, key)
    );

    -- TTL state is local: heartbeats every few seconds must not become
    -- replicated writes.
    CREATE TABLE service_health (
        id            TEXT PRIMARY KEY,
        ttl_ms        INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;

    INSERT INTO meta (key, value) VALUES ('index', '0'), ('hlc', '0');
    "#,
    // 2: sync. Per-field stamps (crdt merge), ownership for scoping (the
    // downstream edge a record came from; '' = this node's own or global),
    // the edge that supplied the current version verbatim (echo
    // suppression), a change feed by modify_index, conflicts, and the hub's
    // view of its edges and of the batches it already applied.
    r#"
    ALTER TABLE records ADD COLUMN fields TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE records ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE records ADD COLUMN src TEXT NOT NULL DEFAULT '';
    CREATE INDEX records_by_index ON records (modify_index);

    CREATE TABLE conflicts (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        kind     TEXT    NOT NULL,
        key      TEXT    NOT NULL,
        edge     TEXT    NOT NULL,
        local    TEXT    NOT NULL,
        remote   TEXT    NOT NULL,
        winner   TEXT    NOT NULL,
        at_ms    INTEGER NOT NULL
    );

    CREATE TABLE edges (
        edge_id      TEXT PRIMARY KEY,
        last_seen_ms INTEGER NOT NULL,
        last_index   INTEGER NOT NULL,
        applied      INTEGER NOT NULL DEFAULT 0,
        last_batch   TEXT    NOT NULL DEFAULT ''
    ) WITHOUT ROWID;

    CREATE TABLE applied_batches (
        edge_id  TEXT    NOT NULL,
        batch_id TEXT    NOT NULL,
        at_ms    INTEGER NOT NULL,
        PRIMARY KEY (edge_id, batch_id)
    ) WITHOUT ROWID;

    -- Telemetry received from downstream edges: append-only, one row per
    -- (device, seq) however often a batch is retried.
    CREATE TABLE telemetry_in (
        device_id TEXT    NOT NULL,
        seq       INTEGER NOT NULL,
        edge_id   TEXT    NOT NULL,
        ts_ms     INTEGER NOT NULL,
        payload   BLOB    NOT NULL,
        PRIMARY KEY (device_id, seq)
    ) WITHOUT ROWID;

    INSERT INTO meta (key, value) VALUES ('sync_index', '0'), ('gc_horizon', '0');
    "#,
    // 3: devices' local state (src/devices/). Heartbeats and telemetry are
    // far too frequent to be replicated writes; the device itself and its
    // alerts are replicated records (kind 'device', 'alert').
    r#"
    -- One row per registered device: what changes with every message.
    CREATE TABLE device_state (
        id                TEXT PRIMARY KEY,
        last_seen_ms      INTEGER NOT NULL,
        interval_ms       INTEGER NOT NULL,
        health            TEXT    NOT NULL DEFAULT 'online',
        battery           INTEGER,
        signal            INTEGER,
        last_telemetry    TEXT,
        last_telemetry_ms INTEGER,
        -- the last telemetry sequence number handed out for this device
        telemetry_seq     INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;

    -- Telemetry history: append-only, idempotent by (device, seq), pruned
    -- by age and by total size. The rowid is insertion order, so the
    -- oldest rows are the cheapest to find.
    CREATE TABLE telemetry (
        id     INTEGER PRIMARY KEY,
        device TEXT    NOT NULL,
        seq    INTEGER NOT NULL,
        ts_ms  INTEGER NOT NULL,
        body   TEXT    NOT NULL,
        UNIQUE (device, seq)
    );
    CREATE INDEX telemetry_by_time ON telemetry (ts_ms);

    -- Device events as received (kept with the same retention as
    -- telemetry).
    CREATE TABLE device_events (
        id     INTEGER PRIMARY KEY,
        device TEXT    NOT NULL,
        ts_ms  INTEGER NOT NULL,
        type   TEXT    NOT NULL,
        body   TEXT    NOT NULL
    );
    CREATE INDEX device_events_by_device ON device_events (device, id);
    CREATE INDEX device_events_by_time ON device_events (ts_ms);

    -- Running byte total of the telemetry history, for the size limit
    -- without a full scan.
    INSERT INTO meta (key, value) VALUES ('telemetry_bytes', '0');
    "#,
    // 4: firmware artifacts (src/firmware/): metadata of the images under
    // the firmware directory, local to this node (the file is the source of
    // truth for the bytes; rollouts, which are replicated, name the digest).
    r#"
    CREATE TABLE firmware (
        sha256      TEXT PRIMARY KEY,
        device_type TEXT    NOT NULL,
        version     TEXT    NOT NULL,
        size        INTEGER NOT NULL,
        signature   TEXT    NOT NULL,
        notes       TEXT    NOT NULL DEFAULT '',
        created_ms  INTEGER NOT NULL,
        UNIQUE (device_type, version)
    ) WITHOUT ROWID;
    "#,
    // 5: the A/B OTA coordinator (src/ota/). Per-device state, never
    // replicated: one row holding the current deployment as JSON (written
    // in the same transaction as the state change it records), and a short
    // log of transitions for operators and the hub report.
    r#"
    CREATE TABLE ota (
        id   INTEGER PRIMARY KEY CHECK (id = 1),
        body TEXT    NOT NULL
    );
    CREATE TABLE ota_log (
        id      INTEGER PRIMARY KEY,
        at_ms   INTEGER NOT NULL,
        state   TEXT    NOT NULL,
        message TEXT    NOT NULL
    );
    "#,
    // 6: digests of the MQTT telemetry and events of the last ingest
    // batches (src/devices/redelivery.rs), written with them: a message the
    // broker sends again because the daemon stopped between the commit and
    // the PUBACK is recognised and not stored twice.
    r#"
    CREATE TABLE mqtt_recent (
        batch   INTEGER PRIMARY KEY,
        digests BLOB    NOT NULL
    );
    "#,
    // 7: what each edge last said of itself in its sync request (version,
    // pending changes, sync failures; JSON, '' for an edge that never
    // sent it), for the hub's fleet view.
    r#"
    ALTER TABLE edges ADD COLUMN status TEXT NOT NULL DEFAULT '';
    "#,
    // 8: the hawkBit DDI client (src/hawkbit/). Local, never replicated:
    // its state (the action in hand, the configData last sent) and the
    // feedback the server has not acknowledged yet, oldest first. A row
    // leaves the outbox only when the server answered 2xx; a `closed` row
    // is written in the same transaction as the action's end.
    r#"
    CREATE TABLE hawkbit_state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE hawkbit_outbox (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        action     TEXT    NOT NULL,
        execution  TEXT    NOT NULL,
        body       TEXT    NOT NULL,
        created_ms INTEGER NOT NULL
    );
    "#,
];

pub const LATEST: i64 = MIGRATIONS.len() as i64;
