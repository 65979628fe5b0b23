-- Archive of the event streams and the lifecycle streams, written in
-- batches by the archivers' consumer group. Rows are keyed by their stream
-- entry (stream key, entry id, position inside the entry), so a redelivered
-- entry inserts nothing twice. Tables are partitioned by day on the event
-- time; the archiver creates partitions as it meets new days, and old days
-- can be detached and dropped for retention.

CREATE TABLE events (
    ts        timestamptz NOT NULL,
    stream    text NOT NULL,
    entry_id  text NOT NULL,
    seq       integer NOT NULL,
    phy_id    text NOT NULL,
    conn_id   uuid NOT NULL,
    server_id text NOT NULL,
    epoch     bigint NOT NULL,
    kind      text NOT NULL,
    detail    jsonb,
    PRIMARY KEY (ts, stream, entry_id, seq)
) PARTITION BY RANGE (ts);

CREATE INDEX events_phy_ts_idx ON events (phy_id, ts DESC, stream, entry_id, seq);

CREATE TABLE transitions (
    at        timestamptz NOT NULL,
    stream    text NOT NULL,
    entry_id  text NOT NULL,
    phy_id    text NOT NULL,
    online    boolean NOT NULL,
    reason    text NOT NULL,
    epoch     bigint,
    rev       bigint,
    PRIMARY KEY (at, stream, entry_id)
) PARTITION BY RANGE (at);

CREATE INDEX transitions_phy_at_idx ON transitions (phy_id, at DESC);

-- One row per connection, merged from its connected / tcp_down /
-- disconnected events in any order (the newest end wins).
CREATE TABLE sessions (
    conn_id        uuid PRIMARY KEY,
    phy_id         text NOT NULL,
    server_id      text NOT NULL,
    epoch          bigint NOT NULL,
    peer           text,
    keepalive_secs integer,
    connected_at   timestamptz,
    ended_at       timestamptz,
    end_reason     text
);

CREATE INDEX sessions_phy_epoch_idx ON sessions (phy_id, epoch DESC);
