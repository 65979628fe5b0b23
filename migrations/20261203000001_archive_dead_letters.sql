-- Archive dead letters: stream entries the archiver could not store,
-- because PostgreSQL rejected their data (a value out of range, a
-- character text cannot hold) or because they do not decode. The archiver
-- isolates such an entry in its batch, writes it here with the error,
-- acknowledges it and carries on, so one bad entry cannot stall the archive
-- and the trimming of the streams. Field values are kept as base64 (an
-- entry's bytes may be exactly what PostgreSQL rejected). Keyed by stream
-- entry, like the archive: a redelivered entry is recorded once.
CREATE TABLE archive_dead_letters (
    stream    text NOT NULL,
    entry_id  text NOT NULL,
    fields    jsonb NOT NULL,
    error     text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);
